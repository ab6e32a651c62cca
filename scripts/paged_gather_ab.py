"""A/B of the paged cache's gather (workspace against a fresh tensor per gather) beside static, one run (docs/perf.md)."""
import time, statistics, torch
from kvbench.config import load_config
from kvbench.weights import build_model
from kvbench.generate import new_cache, generation_steps, cache_tokens, decoder_for
from kvbench.cache import PagedCache
from kvbench.verify import random_prompt

class OldGather(PagedCache):
    def gather(self, layer, reuse=True):
        table = self._table_tensor()
        out = []
        for pool in (self.k[layer], self.v[layer]):
            out.append(pool[table].flatten(1, 2).transpose(1, 2))
        return out[0], out[1]

model = build_model(load_config("default"), torch.device("cpu"), torch.float32)
prompt = random_prompt(model.config, 16, 700, 0)
N = 300
caches = {}
for name in ("static", "paged"):
    caches[name] = new_cache(model, name, 16, cache_tokens(700, N))
old = new_cache(model, "paged", 16, cache_tokens(700, N)); old.__class__ = OldGather
caches["paged-old-gather"] = old
times = {k: [] for k in caches}
with torch.inference_mode():
    for rep in range(4):
        for name, cache in caches.items():
            steps = generation_steps(model, prompt, N, cache, decode=decoder_for(name.split("-")[0], prompt.device))
            next(steps)  # prefill
            t0 = time.perf_counter()
            n = 0
            for _ in steps: n += 1
            if rep: times[name].append((time.perf_counter() - t0) / n * 1e3)
for k, v in times.items(): print(k, round(statistics.median(v), 2), [round(x, 2) for x in v])
