import sys
g=[tuple(map(int,l.split())) for l in open('gaps.txt') if l.strip()]
w=[tuple(map(int,l.split())) for l in open('win.txt') if l.strip()]
res=[];tool=[];entry=[];exit_=[]
for a,b in w:
    o=[(s,e) for s,e in g if s<=b and e>=a]
    if not o: continue
    s,e=max(o,key=lambda x:x[1]-x[0])
    res.append((e-s)/1000); tool.append((b-a)/1000); entry.append((a-s)/1000); exit_.append((e-b)/1000)
def q(v,p): v=sorted(v); return v[min(len(v)-1,int(len(v)*p))]
print(sys.argv[1], "n",len(res),"gap p50 %.1f p90 %.1f"%(q(res,.5),q(res,.9)),"tool p50 %.1f"%q(tool,.5),"entry %.1f exit %.1f"%(q(entry,.5),q(exit_,.5)))
