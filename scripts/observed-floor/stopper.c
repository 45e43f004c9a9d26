/* The floor of the pause a busy thread observes, for comparison with
 * `livecare bench pause --threads 1 --busy`. Run `busy` (records every gap > 5 us
 * between its clock readings; SIGUSR1 prints them as "start end" ns lines), then
 * `stopper PID 0 300 > win.txt` (300 stops: INTERRUPT, wait, GETREGS, a 1 KiB
 * process_vm_readv, 4 x pread+pwrite of 5 code bytes, DETACH; prints each window),
 * then `python3 match.py NAME` matches windows to gaps (gaps.txt, win.txt).
 * Without the read and writes (`stopmin`: sed out the two lines marked OPTIONAL) the
 * observed gap was 43-55 us median on this 2-vCPU VM (2026-11-22), with them 112-116 us:
 * each /proc/PID/mem or process_vm_readv call costs 1.6-2.4 us warm in a loop but far
 * more inside a stop, on cold caches.
 * The second argument 1 pins the stopper to the target's CPU first (measured worse:
 * 347-593 us).
 * Build: gcc -O2 -o busy busy.c && gcc -O2 -o stopper stopper.c
 * Usage: ./busy >> gaps.txt &  then as above (as root). */
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
#include <fcntl.h>
static long long ns(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1000000000LL+t.tv_nsec;}
static int cpu_of(int pid){char p[64],b[2048];sprintf(p,"/proc/%d/stat",pid);int fd=open(p,O_RDONLY);int n=read(fd,b,sizeof b-1);close(fd);b[n]=0;char*s=strrchr(b,')');int f=2;for(;*s;s++) if(*s==' '){f++; if(f==39) return atoi(s+1);} return -1;}
int main(int argc,char**argv){
  int pid=atoi(argv[1]); int same=atoi(argv[2]); int N=atoi(argv[3]);
  ptrace(PTRACE_SEIZE,pid,0,0);
  char p[64]; sprintf(p,"/proc/%d/mem",pid); int mfd=open(p,O_RDWR);
  struct sched_param sp={.sched_priority=10}, sp0={0};
  cpu_set_t all; sched_getaffinity(0,sizeof all,&all);
  long long w[10000], a0[10000], a1[10000];
  for(int it=0;it<N;it++){
    usleep(3000);
    if(same){ cpu_set_t c; CPU_ZERO(&c); CPU_SET(cpu_of(pid),&c); sched_setaffinity(0,sizeof c,&c);} 
    sched_setscheduler(0,SCHED_FIFO,&sp);
    long long t0=ns();
    ptrace(PTRACE_INTERRUPT,pid,0,0);
    int st; 
    if(same) waitpid(pid,&st,__WALL); else { while(waitpid(pid,&st,__WALL|WNOHANG)==0); }
    struct user_regs_struct regs; ptrace(PTRACE_GETREGS,pid,0,&regs);
    /* OPTIONAL */ char buf[1024]; struct iovec l={buf,1024}, r={(void*)(regs.rsp&~7ULL),1024}; process_vm_readv(pid,&l,1,&r,1,0);
    /* OPTIONAL */ char code[16]; for(int k=0;k<4;k++){ pread(mfd,code,5,regs.rip); pwrite(mfd,code,5,regs.rip);} 
    ptrace(PTRACE_DETACH,pid,0,0);
    long long t1=ns(); w[it]=t1-t0; a0[it]=t0; a1[it]=t1;
    sched_setscheduler(0,SCHED_OTHER,&sp0);
    if(same){ sched_setaffinity(0,sizeof all,&all); }
    ptrace(PTRACE_SEIZE,pid,0,0);
  }
  long long s=0; for(int i=0;i<N;i++) s+=w[i]; for(int i=0;i<N;i++) printf("%lld %lld\n",a0[i],a1[i]);
}
