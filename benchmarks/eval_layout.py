import torch, time, sys
sys.path.insert(0,'/work/main')
from qflare.models import FedAvgCNN
torch.set_num_threads(int(sys.argv[1]))
m=FedAvgCNN().eval()
x=torch.randn(10000,1,28,28)
def run(model, xx, bs):
    with torch.inference_mode():
        for s in range(0,10000,bs): model(xx[s:s+bs])
for name, model, xx in [("default",m,x),("cl",m.to(memory_format=torch.channels_last),x.to(memory_format=torch.channels_last))]:
    for bs in (32,64,128,250,500):
        run(model,xx,bs); t=time.perf_counter(); run(model,xx,bs); print(name,bs,round(time.perf_counter()-t,3))
