/* Does splitting the stop over several tracer threads help? For a process with many
 * threads: each of SHARDS tracer threads seizes every SHARDS-th thread; 200 times they
 * all (FIFO) INTERRUPT their threads, wait for them, read their registers, meet at a
 * barrier, and CONT them. Prints first INTERRUPT -> last CONT per round, in us.
 * Measured on this 2-vCPU VM (2026-11-22), 65 threads (bench-target 64 s), medians of
 * three alternating runs: 1 tracer 1455-1580 us, 2 tracers 1654-1947 us. The stopping
 * threads need the CPUs more than the tracer does, so livecare keeps one tracer.
 * Build: gcc -O2 -pthread -o ptrace-shards scripts/ptrace-shards.c
 * Usage: ptrace-shards PID SHARDS | sort -n   (as root) */
/* 64 sleeping threads: one tracer vs two tracer threads (each seizes and stops half). */
#define _GNU_SOURCE
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <sys/user.h>
#include <sched.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>
static long long ns(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1000000000LL+t.tv_nsec;}
int cmp(const void*a,const void*b){long long x=*(long long*)a,y=*(long long*)b;return x<y?-1:x>y;}
static int tids[2000], n, shards; static pthread_barrier_t b1,b2,b3;
static long long t0s[64], t1s[64];
static void *tracer(void*arg){
  int s=(int)(long)arg; struct sched_param sp={.sched_priority=10};
  for(int i=s;i<n;i+=shards) ptrace(PTRACE_SEIZE,tids[i],0,0);
  for(int it=0;it<200;it++){
    pthread_barrier_wait(&b1);
    sched_setscheduler(0,SCHED_FIFO,&sp);
    long long a=ns();
    for(int i=s;i<n;i+=shards) ptrace(PTRACE_INTERRUPT,tids[i],0,0);
    int k=0; for(int i=s;i<n;i+=shards) k++;
    while(k>0){int st; if(waitpid(-1,&st,__WALL|__WNOTHREAD)>0) k--;}
    struct user_regs_struct r; for(int i=s;i<n;i+=shards) ptrace(PTRACE_GETREGS,tids[i],0,&r);
    pthread_barrier_wait(&b2);
    for(int i=s;i<n;i+=shards) ptrace(PTRACE_CONT,tids[i],0,0);
    long long e=ns();
    struct sched_param z={0}; sched_setscheduler(0,SCHED_OTHER,&z);
    if(s==0) t0s[0]=0; /* unused */
    static long long starts[2][200], ends[2][200]; starts[s][it]=a; ends[s][it]=e;
    pthread_barrier_wait(&b3);
    if(s==0){ long long A=starts[0][it],E=ends[0][it]; for(int q=1;q<shards;q++){ if(starts[q][it]<A)A=starts[q][it]; if(ends[q][it]>E)E=ends[q][it]; } t1s[it%64]=0; printf("%lld\n",(E-A)/1000); }
    usleep(3000);
  }
  return 0;
}
int main(int argc,char**argv){
  int pid=atoi(argv[1]); shards=atoi(argv[2]);
  char p[64]; sprintf(p,"/proc/%d/task",pid); DIR*d=opendir(p); struct dirent*e;
  while((e=readdir(d))) if(e->d_name[0]!='.') tids[n++]=atoi(e->d_name);
  pthread_barrier_init(&b1,0,shards); pthread_barrier_init(&b2,0,shards); pthread_barrier_init(&b3,0,shards);
  pthread_t th[4]; for(int s=0;s<shards;s++) pthread_create(&th[s],0,tracer,(void*)(long)s);
  for(int s=0;s<shards;s++) pthread_join(th[s],0);
}
