	.file	"orig.c"
	.text
	.p2align 4
	.globl	base
	.type	base, @function
base:
.LFB23:
	.cfi_startproc
	leal	(%rdi,%rdi,4), %eax
	addl	%eax, %eax
	ret
	.cfi_endproc
.LFE23:
	.size	base, .-base
	.p2align 4
	.globl	value
	.type	value, @function
value:
.LFB24:
	.cfi_startproc
	movl	ticks(%rip), %eax
	addl	$1, %eax
	movl	%eax, ticks(%rip)
	movl	$1, %eax
	ret
	.cfi_endproc
.LFE24:
	.size	value, .-value
	.section	.rodata.str1.1,"aMS",@progbits,1
.LC0:
	.string	"hello"
	.text
	.p2align 4
	.globl	message
	.type	message, @function
message:
.LFB25:
	.cfi_startproc
	leaq	.LC0(%rip), %rax
	ret
	.cfi_endproc
.LFE25:
	.size	message, .-message
	.section	.rodata.str1.1
.LC1:
	.string	"t%ld value=%d msg=%s\n"
	.text
	.p2align 4
	.type	worker, @function
worker:
.LFB26:
	.cfi_startproc
	pushq	%r12
	.cfi_def_cfa_offset 16
	.cfi_offset 12, -16
	leaq	.LC1(%rip), %r12
	pushq	%rbp
	.cfi_def_cfa_offset 24
	.cfi_offset 6, -24
	movq	%rdi, %rbp
	pushq	%rbx
	.cfi_def_cfa_offset 32
	.cfi_offset 3, -32
	.p2align 4,,10
	.p2align 3
.L6:
	call	message
	movq	%rax, %rbx
	call	value
	movq	%rbx, %rcx
	movq	%rbp, %rsi
	movq	%r12, %rdi
	movl	%eax, %edx
	xorl	%eax, %eax
	call	printf@PLT
	movq	stdout(%rip), %rdi
	call	fflush@PLT
	movl	$50000, %edi
	call	usleep@PLT
	jmp	.L6
	.cfi_endproc
.LFE26:
	.size	worker, .-worker
	.section	.rodata.str1.1
.LC2:
	.string	"started base=%d len=%zu\n"
	.section	.text.startup,"ax",@progbits
	.p2align 4
	.globl	main
	.type	main, @function
main:
.LFB27:
	.cfi_startproc
	pushq	%r13
	.cfi_def_cfa_offset 16
	.cfi_offset 13, -16
	pushq	%r12
	.cfi_def_cfa_offset 24
	.cfi_offset 12, -24
	pushq	%rbp
	.cfi_def_cfa_offset 32
	.cfi_offset 6, -32
	pushq	%rbx
	.cfi_def_cfa_offset 40
	.cfi_offset 3, -40
	subq	$24, %rsp
	.cfi_def_cfa_offset 64
	cmpl	$1, %edi
	jg	.L9
	movq	stderr(%rip), %rdi
	call	fflush@PLT
.L10:
	leaq	source_text(%rip), %rdi
	call	strlen@PLT
	movl	$1, %edi
	movq	%rax, %rbx
	call	base
	leaq	.LC2(%rip), %rdi
	movq	%rbx, %rdx
	movl	%eax, %esi
	xorl	%eax, %eax
	call	printf@PLT
	xorl	%edi, %edi
	call	worker
.L9:
	movq	8(%rsi), %rdi
	movl	$10, %edx
	xorl	%esi, %esi
	call	strtol@PLT
	movq	stderr(%rip), %rdi
	movq	%rax, %rbx
	call	fflush@PLT
	movslq	%ebx, %rbp
	subl	$1, %ebx
	jle	.L10
	movl	$1, %ebx
	leaq	8(%rsp), %r13
	leaq	worker(%rip), %r12
	.p2align 4,,10
	.p2align 3
.L12:
	movq	%rbx, %rcx
	movq	%r12, %rdx
	xorl	%esi, %esi
	movq	%r13, %rdi
	call	pthread_create@PLT
	addq	$1, %rbx
	cmpq	%rbp, %rbx
	jne	.L12
	jmp	.L10
	.cfi_endproc
.LFE27:
	.size	main, .-main
	.globl	ticks
	.bss
	.align 4
	.type	ticks, @object
	.size	ticks, 4
ticks:
	.zero	4
	.globl	copy_len
	.data
	.align 4
	.type	copy_len, @object
	.size	copy_len, 4
copy_len:
	.long	13
	.globl	source_text
	.align 32
	.type	source_text, @object
	.size	source_text, 32
source_text:
	.string	"twelve chars"
	.zero	19
	.globl	tls_k
	.section	.tdata,"awT",@progbits
	.align 4
	.type	tls_k, @object
	.size	tls_k, 4
tls_k:
	.long	7
	.ident	"GCC: (Debian 12.2.0-14+deb12u1) 12.2.0"
	.section	.note.GNU-stack,"",@progbits
