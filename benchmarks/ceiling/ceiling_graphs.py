"""(Copied from the team's shared perf probes, ../shared/perf/, 2026-12-01; changed only to report
each run's CPU: the workers' process time over the measured loop, per request.)

In-process ceiling with CUDA-graph replay (the runtime mpsserve's torch path uses), no serving path.

Each of N worker processes loops: take a prepared 2000-row request (CPU numpy), hash ids, build
history offsets, copy into pinned staging tensors, copy to static GPU buffers, replay one captured
graph, copy the 2000 scores back. Ragged history is padded to the pool's largest total into a spare
row 2001 (its score is dropped), as mpsserve does. Prints JSON lines: aggregate req/s, latency.
Run with CUDA_MPS_PIPE_DIRECTORY set for MPS, pointing nowhere for time-slicing.
"""
import argparse, json, multiprocessing as mp, time

from ceiling_probe import ROWS, TABLE, build_model, make_request


def worker(idx, seconds, barrier, out_q, tf32, blocking=False):
    import numpy as np, torch
    torch.set_num_threads(1)
    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.device("cuda")
    model = build_model(torch, dev)
    rng = np.random.default_rng(idx)
    pool = [make_request(np, rng) for _ in range(8)]
    hmax = max(int(r[3].sum()) for r in pool) + 64
    pin = dict(dense=torch.empty((ROWS + 1, 13), dtype=torch.float32).pin_memory(),
               cat=torch.empty((ROWS + 1, 26), dtype=torch.int64).pin_memory(),
               hist=torch.empty(hmax, dtype=torch.int64).pin_memory(),
               off=torch.empty(ROWS + 1, dtype=torch.int64).pin_memory())
    gpu = {k: torch.zeros_like(v, device=dev) for k, v in pin.items()}
    out_host = torch.empty(ROWS + 1, 1, dtype=torch.float32).pin_memory()
    stream = torch.cuda.Stream()

    def stage(req):
        dense, cat, hist, lengths = req
        n = hist.shape[0]
        pin["dense"][:ROWS].numpy()[:] = dense
        np.remainder(cat, TABLE, out=pin["cat"][:ROWS].numpy())
        hv = pin["hist"].numpy()
        np.remainder(hist, TABLE, out=hv[:n]); hv[n:] = 0
        off = pin["off"].numpy(); off[0] = 0
        np.cumsum(lengths[:-1], out=off[1:ROWS]); off[ROWS] = n  # spare row takes the padding
        for k in pin:
            gpu[k].copy_(pin[k], non_blocking=True)

    with torch.inference_mode(), torch.cuda.stream(stream):
        stage(pool[0])
        for _ in range(3):
            model(gpu["dense"], gpu["cat"], gpu["hist"], gpu["off"])
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = model(gpu["dense"], gpu["cat"], gpu["hist"], gpu["off"])

        def serve(req):
            stage(req)
            graph.replay()
            out_host.copy_(out, non_blocking=True)
            if blocking:  # sleep in the driver until the copy lands, instead of spinning a core
                ev = torch.cuda.Event(blocking=True); ev.record(stream); ev.synchronize()
            else:
                stream.synchronize()
            return out_host[:ROWS].numpy().copy()

        for i in range(30):
            serve(pool[i % 8])
        barrier.wait()
        lat, t0, i, c0 = [], time.perf_counter(), 0, time.process_time()
        while time.perf_counter() - t0 < seconds:
            s = time.perf_counter(); serve(pool[i % 8]); lat.append(time.perf_counter() - s); i += 1
    out_q.put((idx, lat, time.perf_counter() - t0, time.process_time() - c0))


def run(n, seconds, tf32, blocking=False):
    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(i, seconds, barrier, q, tf32, blocking)) for i in range(n)]
    for p in procs:
        p.start()
    res = [q.get(timeout=300) for _ in range(n)]
    for p in procs:
        p.join()
    lat = sorted(x for _, l, _, _ in res for x in l)
    total, wall = len(lat), max(w for _, _, w, _ in res)
    cpu_ms = round(1000 * sum(c for *_, c in res) / total, 3)
    pct = lambda p: round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 2)
    return dict(workers=n, qps=round(total / wall, 1), p50_ms=pct(.5), p99_ms=pct(.99),
                cpu_ms_per_req=cpu_ms, blocking=blocking)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True)
    ap.add_argument("--workers", default="8,12")
    ap.add_argument("--seconds", type=float, default=6)
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--blocking", action="store_true")
    a = ap.parse_args()
    for n in map(int, a.workers.split(",")):
        r = run(n, a.seconds, a.tf32, a.blocking); r["label"] = a.label
        print(json.dumps(r), flush=True)
