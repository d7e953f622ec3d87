"""`LLM(tensor_parallel_size=2)` wherever people first try it: piped into `python -`, in
`python -c`, and in a script without an `if __name__ == "__main__":` guard. multiprocessing
re-runs the parent's main script in the workers it starts; from stdin that "script" is a file
named '<stdin>' (a traceback in every worker), and a script without a guard would build its
engine again in each worker. The workers must start from all three, and run the script once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from model_utils import build_checkpoint, tokenizer_dir  # noqa: F401 (fixtures)
from test_models import checkpoints, vocab  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = """\
import json
print("program started", flush=True)
from pagedllm import LLM, SamplingParams
llm = LLM({folder!r}, tensor_parallel_size=2, dtype="float32", kv_cache_memory="64MiB", max_num_batched_tokens=32, max_num_seqs=8)
out = llm.generate("Hello, my name is", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
print(json.dumps(out[0].outputs[0].token_ids), flush=True)
"""


def test_two_ranks_start_from_stdin_dash_c_and_an_unguarded_script(checkpoints, tmp_path):
    program = PROGRAM.format(folder=checkpoints("llama"))
    script = tmp_path / "unguarded.py"
    script.write_text(program)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PAGEDLLM_NO_PROGRESS": "1"}
    ways = {
        "stdin": ([sys.executable, "-"], program),
        "-c": ([sys.executable, "-c", program], None),
        "script": ([sys.executable, str(script)], None),
    }
    # All three at once: each spends most of its time importing torch and loading.
    running = {
        way: subprocess.Popen(
            command, cwd=tmp_path, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for way, (command, _) in ways.items()
    }
    tokens = {}
    for way, process in running.items():
        stdout, stderr = process.communicate(ways[way][1], timeout=300)
        assert process.returncode == 0, f"{way}: exit {process.returncode}\n{stderr[-3000:]}"
        assert "Traceback" not in stderr, f"{way}:\n{stderr[-3000:]}"
        lines = stdout.splitlines()
        assert lines.count("program started") == 1, f"{way}: the program ran again in a worker:\n{stdout}"
        tokens[way] = json.loads(lines[-1])
    assert len(tokens["stdin"]) == 4 and tokens["stdin"] == tokens["-c"] == tokens["script"]
