"""One process of a two-process run on 127.0.0.1 (tests/test_multihost.py starts two, each with 2 simulated CPU
devices): jax.distributed over gloo, a mesh over all 4 devices, the same jspec.decode call on both processes.
Prints one JSON line of results.

    JAX_NUM_CPU_DEVICES=2 python tests/multihost_worker.py PROCESS_ID PORT
"""

from __future__ import annotations

import json
import sys

import jspec

process_id, port = int(sys.argv[1]), int(sys.argv[2])
address = f"127.0.0.1:{port}"
jspec.distributed.initialize(address, num_processes=2, process_id=process_id, coordinator_bind_address=address,
                             initialization_timeout=60)

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from mesh_checks import PROMPTS, random_model  # noqa: E402

target, draft = random_model(0), random_model(1, num_layers=1)
mesh = jspec.make_mesh(data=2, model=2)
results = {"process_count": jax.process_count(), "devices": jax.device_count(), "local": jax.local_device_count()}
for name, strategy, options in [("greedy", "greedy", {}), ("speculative", "speculative", dict(draft=draft, num_draft_tokens=3)),
                                ("sample", "sample", dict(temperature=0.8))]:
    out = jspec.decode(target, PROMPTS, strategy, max_new_tokens=10, key=5, mesh=mesh, **options)
    results[name] = np.asarray(out.tokens).tolist()
# auto depth: each process times its own steps; the costs it decodes with are process 0's (auto_depth.agreed)
out = jspec.decode(target, PROMPTS, "speculative", draft=draft, num_draft_tokens="auto", max_new_tokens=10, mesh=mesh)
results["auto"] = np.asarray(out.tokens).tolist()
from jspec.strategies import auto_depth  # noqa: E402

results["auto_costs"] = [np.asarray(costs.step).tolist() + [float(costs.probe), float(costs.setup)]
                         for costs in auto_depth._MEASURED.values()]
results["auto_priors"] = [prior for _, prior in auto_depth._PRIORS.values()]
if process_id == 0:  # a decode of this process alone (no mesh): it measures without waiting for process 1
    out = jspec.decode(target, PROMPTS, "speculative", draft=draft, num_draft_tokens="auto", max_new_tokens=6)
    results["local_auto"] = np.asarray(out.tokens).tolist()
# process-local prompts: process 0 holds the first three rows, process 1 the rest
local = PROMPTS[:3] if process_id == 0 else PROMPTS[3:]
rows, mine = jspec.distributed.gather_prompts(local)
out = jspec.decode(target, rows, max_new_tokens=10, mesh=mesh)
results["gathered_rows"] = rows
results["local_rows"] = np.asarray(jspec.distributed.local_rows(out, mine).tokens).tolist()
print("RESULTS " + json.dumps(results), flush=True)
jax.distributed.shutdown()
