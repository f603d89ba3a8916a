"""Documentation cannot rot: every `python -m nanoalign.<module> ...` line in a ```bash block of
README.md, the tutorials and docs/ runs here, in order, shrunk to seconds (one step, the micro
world) and pointed at a copy of the micro run instead of out/tiny and data/world. torchrun lines
are parsed (every flag must exist) but not launched."""

import dataclasses
import importlib
import re
import shlex
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ([ROOT / "README.md", ROOT / "data" / "README.md"]
        + sorted((ROOT / "tutorials").rglob("*.md")) + sorted((ROOT / "docs").rglob("*.md")))

# Flags appended to shrink each command to seconds (argparse keeps the last value of a repeated
# flag).
SHRINK = {
    "train_pretrain": ["--stop_at", "1", "--eval_batches", "1"],
    "train_sft": ["--stop_at", "1"], "train_rm": ["--stop_at", "1", "--norm_examples", "8"],
    "train_dpo": ["--stop_at", "1", "--online_pairs", "8", "--max_new_tokens", "16"],
    "train_ppo": ["--stop_at", "1", "--batch_size", "8", "--minibatches", "2",
                  "--max_new_tokens", "16"],
    "train_grpo": ["--stop_at", "1", "--prompts_per_iter", "4", "--group_size", "2",
                   "--minibatches", "2", "--max_new_tokens", "16"],
    "evaluate": ["--n_prompts", "8", "--max_new_tokens", "16"],
    "sample": ["--max_new_tokens", "8"],
    "pipeline": ["--preset", "micro", "--seeds", "1", "--ppo_betas", "0.2", "--dpo_betas", "0.3",
                 "--best_of", "1,2", "--overopt_iters", "2"],
    "world": ["--scale", "0.02"],
    "bench": ["--quick", "--only", "generate"],
    "train_distill": ["--stop_at", "1", "--batch_size", "4", "--max_new_tokens", "16"],
    "gpu_check": ["--dry", "--stages", "pretrain"],
}
SKIP = {"pytest"}  # the test command itself


def documented_commands():
    """(file, line number, shell words) of every command line in a ```bash block of the docs."""
    found = []
    for path in DOCS:
        in_block, pending = False, ""
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("```"):
                in_block = line.strip() in ("```bash", "```sh")
                continue
            text = pending + " " + line.split(" #")[0].strip()
            if in_block and text.endswith("\\"):  # a continued line
                pending = text[:-1]
                continue
            text, pending = text.strip(), ""
            if in_block and text:
                # `pip install ... && python -m ...`: the python part
                text = text.split("&&")[-1].strip()
                if text.startswith(("python -m nanoalign.", "torchrun ")):
                    found.append((path.relative_to(ROOT), i, shlex.split(text)))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_commands_for_every_stage():
    modules = {w[2].split(".")[1] for _, _, w in COMMANDS if w[0] == "python"}
    stages = {"pipeline", "train_sft", "train_rm", "train_ppo", "train_dpo", "train_grpo", "sample",
              "evaluate"}
    assert stages <= modules


def documented_files():
    """{name: text} of the ```python blocks whose first line is `# <name>.py` (e.g. README's
    myreward.py)."""
    files = {}
    for path in DOCS:
        for block in re.findall(r"```python\n(.*?)```", path.read_text(), re.S):
            first = block.splitlines()[0].strip()
            if re.fullmatch(r"# \w+\.py", first):
                files[first[2:]] = block
    return files


@pytest.fixture(scope="module")
def docs_run(micro_run, tmp_path_factory):
    """A private copy of the micro run, so documented commands may write anywhere in it; beside it
    (the commands' working directory) what the "your own" sections assume: a GPT-2 directory at
    models/gpt2 (a tiny random stand-in in Hugging Face's layout), my_data/hh.jsonl and
    hh_test.jsonl (Anthropic HH), my_data/text.txt, data/human_prefs.jsonl (as the labelling tool
    writes it, with its log), data/labels.log.jsonl (as the browser tool writes it), and the files
    the docs show."""
    run = tmp_path_factory.mktemp("docs") / "run"
    shutil.copytree(micro_run, run)
    import json
    import torch
    from nanoalign.model import GPT, GPTConfig
    from test_model import fake_hf_gpt2_state_dict, write_safetensors
    from test_own_data import hh_record
    from test_tokenizer import write_gpt2_files
    gpt2 = run.parent / "models" / "gpt2"
    vocab = write_gpt2_files(str(gpt2))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(vocab), block_size=128, n_layer=1, n_head=2, n_embd=32))
    sd = fake_hf_gpt2_state_dict(model, with_buffers=False)
    write_safetensors(sd, gpt2 / "model.safetensors")
    (gpt2 / "config.json").write_text(json.dumps({"n_head": 2}))
    my_data = run.parent / "my_data"
    my_data.mkdir()
    (my_data / "hh.jsonl").write_text("".join(json.dumps(hh_record(i)) + "\n" for i in range(16)))
    (my_data / "hh_test.jsonl").write_text("".join(json.dumps(hh_record(i)) + "\n"
                                                   for i in range(16, 24)))
    own_text = "Hello world. This is my own text.\n\nA second document.\n"
    (my_data / "text.txt").write_text(own_text * 400)
    # what `python -m nanoalign.label` writes (a copy of preference pairs here)
    (run.parent / "data").mkdir()
    shutil.copy(run / "world" / "prefs_val.jsonl", run.parent / "data" / "human_prefs.jsonl")
    # and the decisions' log beside it
    decisions = [{"prompt_index": i, "choice": c, "A": "ppo.pt", "B": "sft.pt",
                  "models": ["ppo.pt", "sft.pt"]} for i, c in enumerate(["A", "B", "tie", "skip"])]
    log = run.parent / "data" / "human_prefs.jsonl.log.jsonl"
    log.write_text("".join(json.dumps(d) + "\n" for d in decisions))
    # and what `python -m nanoalign.serve --pairs` writes: two raters on pairs with gold scores
    from nanoalign import label
    pairs = label.pairs_from_file(str(run / "world" / "prefs_val.jsonl"), 4)
    served = [label.decision(p, order, choice, rater)
              for rater, order in (("ann", [0, 1]), ("bob", [1, 0]))
              for p, choice in zip(pairs, ["A", "B", "tie", "A"])]
    (run.parent / "data" / "labels.log.jsonl").write_text(
        "".join(json.dumps(d) + "\n" for d in served))
    for name, text in documented_files().items():
        (run.parent / name).write_text(text)
    return run


def remap(value: str, run: Path) -> str:
    """out/tiny/... (or out/micro/...) -> the copy of the micro run; data/world/... -> its world."""
    value = re.sub(r"(?<![\w/])out/(tiny|micro)(?![\w])", str(run), value)
    return re.sub(r"(?<![\w/])data/world", str(run / "world"), value)


def defaults_to_remap(module, argv, run):
    """Config fields left at a default under out/tiny or data/world (e.g. out_dir) are pointed at
    the copy too."""
    cls = next((v for v in vars(module).values()
                if dataclasses.is_dataclass(v) and isinstance(v, type)
                and v.__module__ == module.__name__), None)
    if cls is None:
        return []
    given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    extra = []
    for f in dataclasses.fields(cls):
        if (f.name not in given and isinstance(f.default, str)
                and remap(f.default, run) != f.default):
            extra += [f"--{f.name}", remap(f.default, run)]
    return extra


@pytest.mark.parametrize("where,line,words", COMMANDS, ids=[f"{p}:{n}" for p, n, _ in COMMANDS])
def test_documented_command_runs(where, line, words, docs_run, monkeypatch):
    monkeypatch.chdir(docs_run.parent)
    # `python -m` imports your own reward from the working dir
    monkeypatch.syspath_prepend(str(docs_run.parent))
    if words[0] == "torchrun":  # parse only: the script's flags must all exist
        script = next(w for w in words if w.endswith(".py"))
        name = Path(script).stem
        argv = [remap(w, docs_run) for w in words[words.index(script) + 1:]]
        module = importlib.import_module(f"nanoalign.{name}")
        cls = next(v for v in vars(module).values()
                   if dataclasses.is_dataclass(v) and isinstance(v, type)
                   and v.__module__ == module.__name__)
        from nanoalign import config
        config.parse_config(cls, argv)
        return
    name = words[2].split(".", 1)[1]
    if name in SKIP:
        return
    module = importlib.import_module(f"nanoalign.{name}")
    argv = [remap(w, docs_run) for w in words[3:]]
    argv += defaults_to_remap(module, argv, docs_run) + SHRINK.get(name, [])
    if name == "pipeline":
        argv += ["--out", str(docs_run)] if "--out" not in words else []
    if name == "world":
        argv += ["--out", str(docs_run / "world_doc")]  # never overwrite the run's world
    try:
        module.main(argv)
    except SystemExit as e:
        assert e.code in (0, None), f"{where}:{line}: `{' '.join(words)}` exited with {e.code}"


def script_commands(path: Path) -> list[list[str]]:
    """The shell words of each `python -m nanoalign.` line of a bash script, continuation lines
    joined and $F replaced by its value."""
    text = path.read_text().replace("\\\n", " ")
    value = re.search(r"^F=(\S+)$", text, re.M).group(1)
    return [shlex.split(line.split(" #")[0].replace("$F", value))
            for line in text.splitlines() if line.startswith("python -m nanoalign.")]


def test_every_figure_comes_from_the_one_script_and_each_of_its_commands_is_documented():
    """tutorials/make_figures.sh is the one source of every figure: each image that the docs
    show from tutorials/figures/ is written by one of its lines, each of its plot commands is
    shown (and so run above) by the chapter beside its figure, and each chapter's command that
    writes into tutorials/figures/ is one of the script's."""
    script = script_commands(ROOT / "tutorials" / "make_figures.sh")
    text = (ROOT / "tutorials" / "make_figures.sh").read_text()
    written = {Path(w[w.index("--out") + 1]).name for w in script if "--out" in w}
    copied = set(re.findall(r"(\w+\.png)", " ".join(l for l in text.splitlines()
                                                  if l.startswith("cp "))))
    shown = {name for path in DOCS
             for name in re.findall(r"\]\((?:\.\./tutorials/)?figures/([\w-]+\.png)\)",
                                    path.read_text())}
    assert shown <= written | copied, f"figures no script line makes: {shown - written - copied}"
    documented = [w for _, _, w in COMMANDS]
    for words in script:
        assert words in documented, f"make_figures.sh runs a command no doc shows: {words}"
    for where, line, words in COMMANDS:
        out = words[words.index("--out") + 1] if "--out" in words else ""
        if out.startswith("tutorials/figures/"):
            assert words in script, f"{where}:{line} draws {out} outside make_figures.sh"
