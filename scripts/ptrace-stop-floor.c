/* The floor of one commit stop of a busy thread, syscall by syscall: the syscalls
 * livecare's commit makes for a single-threaded target (INTERRUPT, wait, statx of
 * /proc/PID/task for the thread count, GETREGS, a 1 KiB process_vm_readv of the stack,
 * a 5-byte pread and pwrite of the code at the thread's pc on /proc/PID/mem, then CONT
 * or DETACH and re-SEIZE), 200 times, GAP us apart (default 2000); prints each step's
 * median in us.
 * Build: gcc -O2 -o ptrace-stop-floor scripts/ptrace-stop-floor.c
 * Usage: [GAP=us] [WARM=1] [QOS=1] ptrace-stop-floor PID DETACH(0|1) [fifo]
 *   (as root; PID: a busy single thread, e.g. `int main(){volatile long x=0;for(;;)x++;}`)
 * WARM=1 makes the stop's statx, process_vm_readv, pread and GETREGS once just before
 * each stop (livecare's `rehearse`); QOS=1 holds a 0 us PM QoS request on
 * /dev/cpu_dma_latency during each stop (livecare's idle polling).
 * Measured 2026-11-22 (session 6), medians of the total: plain 85-101 us; WARM 59-64;
 * WARM+QOS 37-53 with GAP=2000 and 57-66 with GAP=10000 (a target CPU whose thread was
 * last stopped 10 ms ago reaches its stop more slowly: wait 11-19 and GETREGS 9-14 us
 * against 5-13 and 2-6).
 * The pwrite writes back the bytes just read: the target's code is unchanged. */
#define _GNU_SOURCE
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/stat.h>
#include <stdio.h>
#include <stdlib.h>
#include <fcntl.h>
#include <time.h>
#include <unistd.h>
#include <sched.h>
static long long ns(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1000000000LL+t.tv_nsec;}
int cmp(const void*a,const void*b){long long x=*(long long*)a,y=*(long long*)b;return x<y?-1:x>y;}
#define N 200
long long T[10][N];
int main(int argc,char**argv){
  int pid=atoi(argv[1]); int det=atoi(argv[2]); int fifo=argc>3;
  int gap=getenv("GAP")?atoi(getenv("GAP")):2000, warm=getenv("WARM")!=NULL;
  int qfd=getenv("QOS")?open("/dev/cpu_dma_latency",O_WRONLY):-1; int zero=0, dflt=-1;
  unsigned long long lastsp=0,lastip=0;
  if(fifo){struct sched_param sp={.sched_priority=10}; sched_setscheduler(0,SCHED_FIFO,&sp);}
  char p[64]; sprintf(p,"/proc/%d/mem",pid); int mfd=open(p,O_RDWR); sprintf(p,"/proc/%d/task",pid);
  ptrace(PTRACE_SEIZE,pid,0,PTRACE_O_TRACECLONE|PTRACE_O_TRACESYSGOOD);
  static char buf[1024];
  for(int it=0;it<N;it++){ usleep(gap);
    if(warm){ struct stat s0; stat(p,&s0); static char wb[1024]; struct iovec wl={wb,1024}, wr={(void*)(lastsp&~7ULL),1024};
      if(lastsp) process_vm_readv(pid,&wl,1,&wr,1,0);
      char b0[8]; if(lastip) pread(mfd,b0,5,lastip);
      struct user_regs_struct r0; ptrace(PTRACE_GETREGS,pid,0,&r0); }
    if(qfd>=0) write(qfd,&zero,4);
    long long t0=ns();
    ptrace(PTRACE_INTERRUPT,pid,0,0); long long t1=ns();
    int st; while(waitpid(pid,&st,__WALL|WNOHANG)==0); long long t2=ns();
    struct stat sb; stat(p,&sb); long long t3=ns();
    struct user_regs_struct r; ptrace(PTRACE_GETREGS,pid,0,&r); long long t4=ns();
    struct iovec l={buf,1024}, rm={(void*)(r.rsp&~7ULL),1024}; process_vm_readv(pid,&l,1,&rm,1,0); long long t5=ns();
    char b[8]; pread(mfd,b,5,r.rip); long long t6=ns(); pwrite(mfd,b,5,r.rip); long long t7=ns();
    ptrace(det?PTRACE_DETACH:PTRACE_CONT,pid,0,0); long long t8=ns();
    if(qfd>=0) write(qfd,&dflt,4);
    lastsp=r.rsp; lastip=r.rip;
    if(det) ptrace(PTRACE_SEIZE,pid,0,PTRACE_O_TRACECLONE|PTRACE_O_TRACESYSGOOD);
    long long d[]={t1-t0,t2-t1,t3-t2,t4-t3,t5-t4,t6-t5,t7-t6,t8-t7,t8-t0};
    for(int k=0;k<9;k++) T[k][it]=d[k];
  }
  const char*nm[]={"int","wait","statx","getregs","vmread","pread","pwrite",det?"detach":"cont","total"};
  for(int k=0;k<9;k++){ qsort(T[k],N,8,cmp); printf("%s %lld ",nm[k],T[k][N/2]/1000);} printf("us (medians) fifo=%d warm=%d qos=%d gap=%d\n",fifo,warm,qfd>=0,gap);
}
