"""`python -m hfnanochat.push`: the dry-run folder loads where hfnanochat is not installed, the model card carries the
run's results, and the real HfApi uploads go out right to a Hub served on loopback (the real Hub is not reachable)."""

import base64
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard, SpaceCard
from test_engine import chat_prompt, reference_greedy, scripted_model, syllable_text, tool_script

from hfnanochat.hub import build_upload_folder, count_parameters, push, push_space
from hfnanochat.push import main as push_main
from hfnanochat.tokenizer import train_tokenizer
from hfnanochat.training.export import save_final

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def write_run(root: Path):
    """A run as the training scripts leave it: two stages' metrics, the SFT final folder, a report folder."""
    tokenizer = train_tokenizer(syllable_text(), vocab_size=512)
    model = scripted_model(tokenizer, *tool_script(tokenizer, "12*7"))
    save_final(model, tokenizer, root / "sft" / "final")
    (root / "pretrain").mkdir()
    steps = [{"step": 1, "loss": 5.0, "tok_per_sec": 100.0, "dt": 2.0}, {"step": 2, "loss": 4.0, "tok_per_sec": 50.0}]
    steps[1]["dt"] = 4.0
    (root / "pretrain" / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps) + '{"step": 3, "lo')
    (root / "sft" / "metrics.jsonl").write_text('{"step": 1, "num_tokens": 1000}\n{"step": 2, "num_tokens": 2500}\n')
    report = root / "report"
    report.mkdir()
    (report / "report.md").write_text("# hfnanochat report\n")
    (report / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n not a real image")
    (report / "chat-eval-sft.json").write_text(
        json.dumps({"metrics": {"GSM8K": 0.05, "ARC-Easy": 0.3, "note": "text"}, "column": "SFT"})
    )
    (report / "base-eval.json").write_text(json.dumps({"metrics": {"CORE": 0.2}, "column": "BASE"}))
    (report / "broken.json").write_text("{not json")
    return model, tokenizer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    model, tokenizer = write_run(root)
    return root, model, tokenizer


@pytest.fixture(scope="module")
def dry_run(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("dry") / "upload"
    assert push_main([str(run[0] / "sft" / "final"), "--repo", "me/tiny", "--native", "--dry-run", str(out)]) == 0
    return out


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_dry_run_folder_holds_the_model_report_and_card(run, dry_run):
    root = run[0]
    names = set(files(dry_run))
    final = {p.name for p in (root / "sft" / "final").iterdir()}
    assert final <= names and {"README.md", "report.md", "loss.png", "native/config.json"} <= names
    model_files = {
        "model.safetensors",
        "config.json",
        "modeling_hfnanochat.py",
        "tokenizer.json",
        "chat_template.jinja",
    }
    assert model_files <= final
    assert "broken.json" not in names and not any(n.endswith(".json") and "eval" in n for n in names)


def test_dry_run_folder_loads_where_hfnanochat_is_not_installed(run, dry_run, tmp_path):
    _, model, tokenizer = run
    prompt = chat_prompt(tokenizer, "what is 12 times 7")
    expected = reference_greedy(model, tokenizer, prompt, 12)
    # -I: no PYTHONPATH, no cwd, no user site; -S: no site processing, so the editable install's path hook (a .pth
    # file) is not read; site-packages is added by hand for torch and transformers
    code = f"""
import importlib.util, json, sys
sys.path.append({sysconfig.get_paths()["purelib"]!r})
assert importlib.util.find_spec("hfnanochat") is None, "hfnanochat is importable"
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
folder, prompt = {str(dry_run)!r}, {prompt!r}
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # it reads config.json's auto_map
ids = tok.apply_chat_template([{{"role": "user", "content": "what is 12 times 7"}}], add_generation_prompt=True,
                              tokenize=True, return_dict=True)["input_ids"]
out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
native = AutoModelForCausalLM.from_pretrained(folder + "/native", dtype=torch.float32).eval()
x = torch.tensor([prompt])
diff = (native(x).logits - model(x).logits).abs().max().item()
chat = pipeline("text-generation", model=folder, trust_remote_code=True)
reply = chat([{{"role": "user", "content": "what is 12 times 7"}}], max_new_tokens=12, do_sample=False)
print(json.dumps(dict(ids=list(ids), out=out, diff=diff, native=type(native).__name__,
                      reply=reply[0]["generated_text"][-1]["content"], modules=sorted(m for m in sys.modules
                      if m.startswith("hfnanochat")))))
"""
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-I", "-S", "-c", code]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["ids"] == prompt  # the shipped chat template renders nanochat's format
    assert got["out"][: len(expected)] == expected
    assert got["native"] == "NanoChatForCausalLM" and got["diff"] < 1e-4
    assert got["reply"].startswith("12*7")  # the scripted call, as text: plain generate runs no tool
    assert got["modules"] == []  # the remote code is transformers' dynamic module, not our package


def test_model_card_parses_and_carries_the_run(run, dry_run):
    root = run[0]
    card = ModelCard.load(dry_run / "README.md")
    results = {r.dataset_name: r for r in card.data.eval_results}
    assert set(results) == {"GSM8K", "ARC-Easy"}  # the SFT column only: CORE is the base model's
    assert results["GSM8K"].metric_value == 0.05 and results["GSM8K"].dataset_type == "openai/gsm8k"
    assert results["ARC-Easy"].metric_value == 0.3 and results["ARC-Easy"].dataset_config == "ARC-Easy"
    assert card.data.license == "mit" and card.data.pipeline_tag == "text-generation"
    params = count_parameters(root / "sft" / "final")
    assert params == sum(p.numel() for p in run[1].parameters())
    assert f"| parameters | {params:,} " in card.text
    assert "| pretrain | 400 |" in card.text and "| sft | 2,500 |" in card.text  # 100*2 + 50*4; TRL's count
    for usage in ("trust_remote_code=True", 'pipeline("text-generation"', "python -m hfnanochat.chat --model me/tiny"):
        assert usage in card.text
    assert "lm_eval --model hf" in card.text and 'subfolder="native"' in card.text and "## Limitations" in card.text


def test_bad_input_is_a_one_line_error(run, tmp_path, capsys):
    final = str(run[0] / "sft" / "final")
    with pytest.raises(SystemExit) as e:
        push_main([final, "--repo", "no-slash"])
    assert e.value.code == 2 and "--repo must be ORG/NAME" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    assert push_main([str(broken), "--repo", "me/x", "--dry-run", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "manifest.json" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_native_refuses_a_2026_architecture(run, tmp_path):
    _, _, tokenizer = run
    from test_engine import random_model, tiny_config

    save_final(random_model(tiny_config(len(tokenizer), smear=True)), tokenizer, tmp_path / "x" / "final")
    with pytest.raises(ValueError, match="trust_remote_code"):
        build_upload_folder(tmp_path / "x" / "final", tmp_path / "up", "me/x", native=True)
    assert not (tmp_path / "up").exists()


# ---------------------------------------------------------------------------------------------------------------------
# A Hub on loopback: the endpoints upload_folder and create_repo call, keeping files per repo and counting commits.
# The real Hub would answer "lfs" (then Xet) for the weights; this one asks for every file inline ("regular"), which
# keeps the client's preupload/commit/skip-unchanged logic while leaving out the storage backend.


class LoopbackHub(ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repos: dict[tuple[str, str], dict] = {}  # (type, id) -> {"files": {path: bytes}, "commits": [...]}
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization header
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def repo(self):
        kind, ns, name = self.path.split("?")[0].split("/")[2:5]
        return self.server.repos.get((kind.rstrip("s"), f"{ns}/{name}"))

    def do_GET(self):
        hub = self.server
        hub.requests.append(("GET", self.path, self.headers.get("Authorization")))
        repo = self.repo()
        if repo is None:
            return self.reply(404, {"error": "Repository not found"})
        kind, ns, name = self.path.split("?")[0].split("/")[2:5]
        sha = repo["commits"][-1]["oid"] if repo["commits"] else "0" * 40
        self.reply(200, {"id": f"{ns}/{name}", "sha": sha, "private": repo["private"], "siblings": []})

    def do_POST(self):
        hub = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        hub.requests.append(("POST", self.path, self.headers.get("Authorization")))
        path = self.path.split("?")[0]
        with hub.lock:
            if path == "/api/repos/create":
                payload = json.loads(body)
                key = (payload.get("type", "model"), f"{payload['organization']}/{payload['name']}")
                if key in hub.repos:
                    return self.reply(409, {"error": "You already created this repo", "url": f"{hub.url}/{key[1]}"})
                hub.repos[key] = {"files": {}, "commits": [], "payload": payload}
                hub.repos[key]["private"] = payload.get("visibility") == "private"
                return self.reply(200, {"url": f"{hub.url}/{key[1]}"})
            if path == "/api/validate-yaml":
                return self.reply(200, {"errors": [], "warnings": []})
            repo = self.repo()
            if repo is None:
                return self.reply(404, {"error": "Repository not found"})
            if "/preupload/" in path:
                out = []
                for f in json.loads(body)["files"]:
                    stored = repo["files"].get(f["path"])
                    oid = None if stored is None else hashlib.sha1(b"blob %d\0" % len(stored) + stored).hexdigest()
                    out.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
                return self.reply(200, {"files": out})
            if "/commit/" in path:
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header = next(x["value"] for x in lines if x["key"] == "header")
                inline = [x["value"] for x in lines if x["key"] == "file"]
                added = {f["path"]: base64.b64decode(f["content"]) for f in inline}
                if any(x["key"] not in ("header", "file") for x in lines):
                    return self.reply(400, {"error": "only inline files here"})
                repo["files"].update(added)
                oid = hashlib.sha1(f"{len(repo['commits'])}{sorted(added)}".encode()).hexdigest()
                repo["commits"].append({"oid": oid, "summary": header["summary"], "files": sorted(added)})
                kind, ns, name = path.split("/")[2:5]
                prefix = "" if kind == "models" else f"{kind}/"
                return self.reply(200, {"commitUrl": f"{hub.url}/{prefix}{ns}/{name}/commit/{oid}", "commitOid": oid})
        self.reply(404, {"error": f"no route {path}"})


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the tests' default; this Hub is loopback
    server = LoopbackHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_push_uploads_the_dry_run_folder_and_a_second_push_makes_no_commit(run, dry_run, hub):
    root = run[0]
    api = HfApi(endpoint=hub.url, token="hf_test_token")
    push(root / "sft" / "final", "me/tiny", native=True, api=api)
    repo = hub.repos[("model", "me/tiny")]
    assert repo["payload"] == {"name": "tiny", "organization": "me", "type": "model"}  # visibility: the owner's
    assert repo["files"] == files(dry_run)  # exactly the dry run's folder, byte for byte
    assert len(repo["commits"]) == 1 and repo["commits"][0]["summary"] == "Upload sft checkpoint with hfnanochat"
    assert all(auth == "Bearer hf_test_token" for _, _, auth in hub.requests)
    assert any("/api/models/me/tiny/preupload/main" in p for _, p, _ in hub.requests)

    info = push(root / "sft" / "final", "me/tiny", native=True, api=api)  # nothing changed
    assert len(repo["commits"]) == 1 and info.oid == repo["commits"][0]["oid"]

    (root / "report" / "report.md").write_text("# hfnanochat report, revised\n")
    try:
        push(root / "sft" / "final", "me/tiny", native=True, api=api)
    finally:
        (root / "report" / "report.md").write_text("# hfnanochat report\n")
    assert len(repo["commits"]) == 2 and repo["commits"][1]["files"] == ["report.md"]  # only what changed


def test_push_space_publishes_the_app_with_the_package(hub):
    api = HfApi(endpoint=hub.url, token="hf_test_token")
    push_space("me/chat", "me/tiny", private=True, api=api)
    repo = hub.repos[("space", "me/chat")]
    assert repo["payload"]["sdk"] == "gradio" and repo["private"]
    names = set(repo["files"])
    assert {"app.py", "README.md", "requirements.txt", "hfnanochat/inference/engine.py", "hfnanochat/chat.py"} <= names
    assert repo["files"]["app.py"] == (REPO / "spaces_app" / "app.py").read_bytes()
    card = SpaceCard(repo["files"]["README.md"].decode())
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py" and card.data.models == ["me/tiny"]
    import gradio

    assert card.data.sdk_version == gradio.__version__  # the version the tests ran
