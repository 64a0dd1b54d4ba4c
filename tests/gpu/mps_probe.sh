#!/usr/bin/env bash
# Probe the real MPS control daemon on the GPU host: what each command prints, and what
# happens to the server and its clients when the control daemon or the server is killed.
# The stand-in control binary (tests/mps_standin) imitates what this prints.
set -u
P=/tmp/mpsprobe; rm -rf $P; mkdir -p $P/pipe $P/log
export CUDA_MPS_PIPE_DIRECTORY=$P/pipe CUDA_MPS_LOG_DIRECTORY=$P/log
ask() { echo "--- [$1]"; echo "$1" | timeout 10 nvidia-cuda-mps-control; echo "rc=$?"; }
which nvidia-cuda-mps-control nvidia-cuda-mps-server
ask get_server_list
echo "--- start -d"; nvidia-cuda-mps-control -d; echo "rc=$?"; sleep 1
ls -la $P/pipe; echo "pidfile: $(cat $P/pipe/nvidia-cuda-mps-control.pid 2>&1)"
echo "--- start -d again"; nvidia-cuda-mps-control -d; echo "rc=$?"
for c in get_server_list get_default_active_thread_percentage "set_default_active_thread_percentage 50" \
  get_default_active_thread_percentage "set_default_device_pinned_mem_limit 0 2G" \
  "get_default_device_pinned_mem_limit 0" bogus_command "get_client_list 1"; do ask "$c"; done
client='import torch,os,sys,time
x=torch.ones(1024,device="cuda"); print("client",os.getpid(),"up",flush=True)
for i in range(int(sys.argv[1])):
    try:
        y=(x*2).sum().item(); torch.cuda.synchronize(); print("client",os.getpid(),"ok",i,flush=True)
    except Exception as e:
        print("client",os.getpid(),"ERR",i,type(e).__name__,str(e)[:160],flush=True); break
    time.sleep(1)'
CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=2G python3 -c "$client" 30 > $P/c1.log 2>&1 &
CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 python3 -c "$client" 30 > $P/c2.log 2>&1 &
sleep 10
ask get_server_list; server=$(echo get_server_list | nvidia-cuda-mps-control | head -1)
echo "--- 64 clients at once (a busy daemon refuses: which message, which exit code?)"
for i in $(seq 64); do (out=$(echo get_server_list | timeout 10 nvidia-cuda-mps-control 2>&1); echo "rc=$? ${out:-<empty>}") & done | sort | uniq -c; wait
ask "get_client_list $server"; ask "get_server_status $server"; ask "get_device_client_list $server"
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv
ps -eo pid,ppid,comm | grep -i mps
echo "=== kill -9 control daemon"; kill -9 "$(cat $P/pipe/nvidia-cuda-mps-control.pid)"; sleep 3
ps -eo pid,ppid,comm | grep -i mps; ls $P/pipe; ask get_server_list
echo "=== restart control daemon"; nvidia-cuda-mps-control -d; echo "rc=$?"; sleep 2
ask get_server_list
python3 -c "$client" 3 > $P/c3.log 2>&1; cat $P/c3.log | tail -2
ask get_server_list; s2=$(echo get_server_list | nvidia-cuda-mps-control | tail -1); ask "get_client_list $s2"
echo "=== kill -9 server(s)"; for s in $(echo get_server_list | nvidia-cuda-mps-control); do kill -9 $s; done; sleep 3
ask get_server_list
python3 -c "$client" 3 > $P/c4.log 2>&1; tail -2 $P/c4.log
wait
echo "=== client logs"; for f in $P/c1.log $P/c2.log; do echo "$f"; grep -v " ok " $f | head -5; grep -c " ok " $f; done
echo "=== control log"; tail -25 $P/log/control.log; echo "=== server log"; tail -15 $P/log/server.log
ask quit; sleep 1; ps -eo pid,comm | grep -i mps || echo "no mps processes left"
