/* The ptrace floor of a commit stop, for comparison with livecare's own pause.
 * Seizes every thread of PID, then 200 times: INTERRUPT all, wait all, GETREGS and a
 * 1 KiB process_vm_readv per thread, one pread and one (failing) pwrite on
 * /proc/PID/mem, then CONT (or DETACH and re-SEIZE) all. Prints the median and p99 of
 * first-stop -> last-resume, and of interrupt -> all stopped.
 * Build: gcc -O2 -o ptrace-floor scripts/ptrace-floor.c
 * Usage: ptrace-floor PID FIFO(0|1) SPIN(0|1) DETACH(0|1)   (as root) */
#define _GNU_SOURCE
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>
#include <fcntl.h>
static long long ns(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1000000000LL+t.tv_nsec;}
int cmp(const void*a,const void*b){long long x=*(long long*)a,y=*(long long*)b;return x<y?-1:x>y;}
int main(int argc,char**argv){
  int pid=atoi(argv[1]); int fifo=atoi(argv[2]); int spin=atoi(argv[3]); int det=atoi(argv[4]); int N=200;
  int tids[1100],n=0; char p[64]; sprintf(p,"/proc/%d/task",pid); DIR*d=opendir(p); struct dirent*e;
  while((e=readdir(d))) if(e->d_name[0]!='.') tids[n++]=atoi(e->d_name);
  for(int i=0;i<n;i++) if(ptrace(PTRACE_SEIZE,tids[i],0,0)) perror("seize");
  sprintf(p,"/proc/%d/mem",pid); int mfd=open(p,O_RDWR);
  long long pause_[N], stopt[N];
  struct sched_param sp={.sched_priority=10};
  for(int it=0;it<N;it++){
    usleep(2000);
    if(fifo) sched_setscheduler(0,SCHED_FIFO,&sp);
    long long t0=ns(), first=0;
    for(int i=0;i<n;i++) ptrace(PTRACE_INTERRUPT,tids[i],0,0);
    for(int k=0;k<n;){int st; int r=waitpid(-1,&st,__WALL|(spin?WNOHANG:0)); if(r>0){ if(!first) first=ns(); k++;} }
    long long t1=ns();
    struct user_regs_struct regs; static char buf[1024*1100]; static struct iovec l[1100],rm[1100];
    for(int i=0;i<n;i++){ ptrace(PTRACE_GETREGS,tids[i],0,&regs); l[i].iov_base=buf+i*1024; l[i].iov_len=1024; rm[i].iov_base=(void*)(regs.rsp&~7ULL); rm[i].iov_len=1024;}
    process_vm_readv(pid,l,n,rm,n,0);
    char b[16]; pread(mfd,b,16,regs.rip&~15ULL); 
    pwrite(mfd,b,8,0x0); /* fails (addr 0): measures syscall cost only */
    for(int i=0;i<n;i++) ptrace(det?PTRACE_DETACH:PTRACE_CONT,tids[i],0,0);
    long long t2=ns(); if(det) for(int i=0;i<n;i++) ptrace(PTRACE_SEIZE,tids[i],0,0);
    if(fifo){ sp.sched_priority=0; sched_setscheduler(0,SCHED_OTHER,&sp); sp.sched_priority=10;}
    pause_[it]=t2-first; stopt[it]=t1-t0;
  }
  qsort(pause_,N,8,cmp); qsort(stopt,N,8,cmp);
  printf("det %d threads %d fifo %d spin %d: pause(first stop->last cont) med %lld p99 %lld us; interrupt->all stopped med %lld us\n",det,n,fifo,spin,pause_[N/2]/1000,pause_[N*99/100]/1000,stopt[N/2]/1000);
}
