"""Fault matrix: steady load on a running mpsserve service while faults hit it, one at a time.

    mpsserve serve --config SERVICE.yaml                     # the service, already running
    python -m benchmarks.fault_matrix --config SERVICE.yaml [--url http://127.0.0.1:8000] \\
        [--address RAY_ADDRESS] [--cases kill-model-replica,...] [--out r.json] [--markdown r.md]

**Run it on the node that hosts the service.** Faults are local: signals to the pids that
``mpsserve status`` reports (each pid's command line is checked first: a Serve replica of this
application, or the MPS control daemon, so a stale pid never hits another process), and writes
into the model's store, a local directory named in the service YAML.

Cases, in this order (``--cases`` picks some, in the order given):

* ``kill-model-replica``: SIGKILL one model replica.
* ``kill-ingress``: SIGKILL the ingress replica holding most of the load's connections.
* ``stop-model-replica-45s``: SIGSTOP one model replica, SIGCONT ``--stop-s`` (45) later.
* ``kill-mps-daemon``: SIGKILL the node's MPS control daemon (skipped when status shows none).
* ``publish-new-version``: copy the serving version to N+1 (a temp dir, then one rename).
* ``publish-corrupt-version``: N+1 with the same files, the model's (graph, weights) garbage,
  its JSON metadata and done marker intact (atomic too); removed after the window so the store
  is serviceable again (the number is not reused within the run).
* ``publish-slow-version``: N+1 written in place, the runtime's first file (TensorFlow
  ``saved_model.pb``, PyTorch ``signature.json``) then, ``--slow-gap-s`` (12) later, the rest
  (``variables/`` / ``model.pt2`` last, a ``done_marker`` after them).

* ``gpu-client-fault``: one replica's next request faults its GPU (``--fault-kind``:
  ``address``, a kernel storing to an unmapped address, or ``assert``, a device-side assert;
  simulated on a replica without CUDA); under MPS every replica of the node's GPU is expected
  to be replaced (each that started before the fault exits), without MPS the one hit.
* ``device-memory-over-limit``: one replica's next request allocates twice
  ``mps.limits.pinned_mem_limit_mb`` on its GPU; that request may fail (out of memory), no
  replica may be replaced.

The last two need ``MPSSERVE_INJECT_FAULT_FILE`` set to the same path for the service (its
replicas) and for the matrix (tests only: mpsserve/model/runtime/injected.py).

Published versions are copies of the one serving; they stay in the store.

Load: ``--concurrency`` closed-loop workers (over ``--processes`` client processes) send
KServe v2 binary-tensor requests of ``--rows`` rows of the demo workload
(``mpsserve.ops.demo.make_request``) to ``/v2/models/<model>/infer`` from before the first case to
after the last; a worker pauses 0.1 s after a failure. Every outcome is kept: send and reply
time, status (``200``; an HTTP code; ``bad-reply``; ``timeout`` after ``--timeout-s``; a
transport error's class name) and the response's ``model_version``.

Status: one child process keeps a Ray connection and writes the report of ``mpsserve status
--json`` (the same ``mpsserve.ops.status.gather``) every ``--poll-s``; a fresh ``mpsserve status``
per poll costs a new Ray driver (3 s, 2 CPU-s on a 2-core machine).

Definitions, per case (t0 = the fault: the signal, the rename, the first file written):

* baseline: the ``--baseline-s`` before t0; ``p99_steady_ms`` over its good replies.
* window: t0 to t0 + (how long the fault lasts: ``--stop-s``, the slow publish's gap) +
  ``--window-s``, extended by up to ``--max-extra-s`` while not recovered. Requests count in
  the window when their reply (or failure) arrives in it; ``p99_window_ms`` is over its good
  replies; ``versions_served`` counts its good replies per ``model_version``.
* healthy status poll (started after t0): ``ok``; as many model replicas and ingresses as at
  the start of the matrix, every one answering; every model replica serving the same single
  version, the expected one (kills: the one before; new and slow publish: N+1; corrupt: the one
  before, and every replica lists N+1 as failed); a killed pid (replica, ingress, MPS daemon)
  no longer listed.
* time to recover: from t0 to max(first poll of the last unbroken run of healthy polls, reply
  time of the last failed request); counted only if that run and the absence of failures then
  lasted ``--quiet-s``; null when not within the window.
* after the window, until status is healthy again (``--settle-timeout-s``): failures there are
  ``failed_after_window`` (the next case starts only then).
* verdict: PASS when no request failed in the window or after it (``kill-ingress``: requests
  already sent at the kill, i.e. in flight, may fail, and so may a request the client wrote,
  within 1 s of the kill, on a kept-alive connection the killed ingress held: a transport
  error, no HTTP status; no server can answer those), no split versions at the end (last status
  poll and replies of the last ``--quiet-s``), and recovered; SKIP with a reason; else FAIL.

Also per case: ``model_pids_before/after/replaced``, ``graphs_before/after`` (CUDA graphs per
replica from its status row: on, off, ``-`` when not reported), ``store_failed_at_end``,
``version_flips`` (changes of version between consecutive replies), ``status_timeline`` (each
change of the healthy verdict), ``per_second`` (good and failed replies), ``max_window_ms``.
The JSON file is rewritten after every case; ``--markdown`` writes one row per case and the
verdicts. Exit status: 0 when no case FAILs, 1 when one does, 2 when it could not start, 130
when interrupted (SIGCONT is sent to a stopped replica first).
"""

from __future__ import annotations
