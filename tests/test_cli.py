"""The `seal` command end to end on the tiny model."""

import json
import subprocess
import sys


def seal(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "seal", *args], capture_output=True, text=True, timeout=timeout
    )


def test_baselines_tiny_demo_four_rows(tmp_path):
    out = tmp_path / "out.json"
    r = seal(
        "baselines",
        "--model",
        "tiny-random",
        "--data",
        "demo",
        "--limit",
        "3",
        "--json",
        str(out),
        "self_edit.n_samples=2",
        "self_edit.max_new_tokens=24",
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [x["row"] for x in rows] == ["base", "passage", "own", "teacher"]
    for x in rows:
        assert {"mean", "n", "ci_low", "ci_high"} <= x.keys()
        assert x["n"] > 0 and x["ci_low"] <= x["mean"] <= x["ci_high"]


def test_models_lists_presets():
    r = seal("models", "--json")
    assert r.returncode == 0, r.stderr
    names = {m["name"] for m in json.loads(r.stdout)}
    assert {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "tiny-random"} <= names


def test_bad_override_is_one_line_error():
    r = seal("baselines", "--model", "tiny-random", "inner_loop.epochz=3")
    assert r.returncode == 2
    assert "inner_loop.epochz: unknown key (did you mean 'epochs'?)" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_data_file_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    r = seal("baselines", "--model", "tiny-random", "--data", str(bad))
    assert r.returncode == 2 and "record 0: expected an object" in r.stderr
    assert "Traceback" not in r.stderr


class _Server:
    """A loopback OpenAI-compatible endpoint: a teacher that writes implications and a judge
    that says yes when the gold answer is in the prediction."""

    def __init__(self):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                if "Gold answer" in prompt:
                    text = "no"
                else:
                    text = "1. The first implication.\n2. The second implication."
                n = body.get("n", 1)
                out = json.dumps(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {
                                "index": i,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": text},
                            }
                            for i in range(n)
                        ],
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_baselines_with_teacher_and_judge_endpoints(tmp_path):
    srv = _Server()
    out = tmp_path / "out.json"
    env_cache = {"SEAL_CACHE": str(tmp_path / "cache")}
    import os

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "seal",
            "baselines",
            "--model",
            "tiny-random",
            "--data",
            "demo",
            "--limit",
            "1",
            "--teacher-url",
            srv.url,
            "--json",
            str(out),
            "rows=[teacher]",
            "self_edit.n_samples=2",
            f"judge.base_url={srv.url}",
            "judge.model=j",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env_cache},
    )
    srv.httpd.shutdown()
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    assert row["row"] == "teacher" and row["inner_loops"] == 2
    assert row["metrics"]["judge"]["mean"] == 0.0 and row["metrics"]["judge"]["n"] > 0
