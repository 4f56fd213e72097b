"""The README's and docs/'s commands run as written, in order, from a fresh clone after `make demo`.

The convention every page follows (README.md, "How the docs are tested"):

- A ```bash block is run: each page's blocks in order, each block as one bash script that stops at its first failing
  command, in a fresh copy of the repository (its git-listed files) in which the README's quickstart block (`make
  demo`) has run, with the project's venv as `.venv` (so `source .venv/bin/activate` and the console scripts work).
  Pages do not share state; they run two at a time.
- The commands' text is never changed. What makes them quick is the copy's configs: every configs/*.yaml there is
  rewritten to a small model (the family's `-mini` preset, 32-token samples, 3 steps, one evaluation batch, no
  compile, W&B off). Values a command sets itself (train.steps=100, say) stay as written.
- `make demo` runs the Makefile's own demo recipe (with `-o .venv/.installed`: the venv running this test is the
  installed one); any other make target is only dry-run (`make -n`): `make test` is this suite.
- ```text and ```console blocks are shown, never run: commands that need a GPU, a cluster, the network, more than 2
  processes, minutes (benchmarks) or the user's own files, and output. Their `launch local` lines that name one of
  the repository's configs are checked with the launcher's own config check at their rank count, so a layout shown
  there is one the trainer accepts.
- Every fence names its language (bash, text, console, yaml or python), so no shell command can escape the test by
  sitting in an unmarked block.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
RUN = "bash"
SHOWN = ("text", "console", "yaml", "python")
DRY_MAKE = "-n"  # make targets other than demo are only printed
VENV = Path(sys.prefix)
# what the copy's configs are rewritten to; a command's own overrides still win
TINY = {
    "data": {"seq_len": 32, "num_workers": 0},
    "train": {"steps": 3, "micro_batch": 4, "eval_steps": 1, "sample_tokens": 8, "compile": False, "precision": "fp32"},
    "log": {"every": 1, "wandb": {"mode": "disabled"}},
}


def fences(page: Path) -> list[tuple[str, str, int]]:
    """(language, body, line number) of each fenced block of a markdown page, in order."""
    text = page.read_text()
    return [(m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def bash_blocks(page: Path) -> list[tuple[str, int]]:
    return [(body, line) for lang, body, line in fences(page) if lang == RUN]


def repo_files() -> list[str]:
    """What a clone holds: the tracked files, plus files not yet committed that git does not ignore."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    return sorted({p for p in out.decode().split("\0") if p and (REPO / p).is_file()})


def fresh_clone(dest: Path) -> Path:
    """A copy of the repository's files at `dest`, its `.venv` the venv this test runs in."""
    for rel in repo_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    (dest / ".venv").symlink_to(VENV, target_is_directory=True)
    return dest


def shrink_configs(root: Path) -> None:
    """Rewrites each configs/*.yaml of the copy to the small sizes of TINY."""
    for path in (root / "configs").glob("*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        arch = cfg.get("model", {}).get("arch", "gpt")
        keep = {k: v for k, v in cfg.get("model", {}).items() if k in ("arch", "dropout")}
        cfg["model"] = {**keep, "preset": f"{arch}-mini", "max_seq_len": 64}
        for section, values in TINY.items():
            merged = {**cfg.get(section, {}), **values}
            if section == "log":
                merged["wandb"] = {**cfg.get("log", {}).get("wandb", {}), **values["wandb"]}
            cfg[section] = merged
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def as_script(body: str) -> str:
    """A bash block as the script the test runs: `make demo` as the Makefile's recipe, other targets dry-run."""
    lines = ["set -eo pipefail"]
    for line in body.splitlines():
        match = re.match(r"^(\s*)make\s+([\w-]+)(.*)$", line)
        if match:
            indent, target, rest = match.groups()
            flag = "" if target == "demo" else DRY_MAKE
            line = f"{indent}make -o .venv/.installed {flag} {target}{rest}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def run_script(body: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """One bash block run in `cwd`, the venv's bin first on PATH, every command traced to stderr."""
    env = {
        **os.environ,
        "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "PS4": "+ ",
    }
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-x", "-s"],
        input=as_script(body),
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
        check=False,
    )


def failure(page: Path, line: int, body: str, res: subprocess.CompletedProcess) -> str:
    return (
        f"{page.relative_to(REPO)}:{line}: this ```bash block failed (exit {res.returncode}):\n{body}\n"
        f"--- stdout (end) ---\n{res.stdout[-3000:]}\n--- stderr (end) ---\n{res.stderr[-5000:]}"
    )


@pytest.fixture(scope="module")
def after_demo(tmp_path_factory) -> Path:
    """A fresh clone, its configs made small, after the README's first ```bash block: the quickstart, `make demo`
    (the start of every page; the README's page goes on from its second block)."""
    root = fresh_clone(tmp_path_factory.mktemp("clone") / "repo")
    shrink_configs(root)
    body, line = bash_blocks(README)[0]
    assert re.search(r"^make demo\b", body, re.MULTILINE), "README's first ```bash block must run `make demo`"
    res = run_script(body, root)
    assert res.returncode == 0, failure(README, line, body, res)
    return root


PAGES_WITH_COMMANDS = [p for p in PAGES if bash_blocks(p)]
WORKERS = 2  # pages run two at a time: most commands are one process, and the suite's machines have 2 cores


def commands(page: Path) -> int:
    """How many `trainer`/`launch` commands a page's ```bash blocks hold (a rough measure of its time)."""
    return sum(len(re.findall(r"^\s*(?:launch|trainer)\b", body, re.MULTILINE)) for body, _ in bash_blocks(page))


def run_page(page: Path, start: Path, work: Path) -> tuple[int, str | None]:
    """Runs a page's ```bash blocks in order in a copy of `start`; (blocks run, the first failure or None). The
    README's first block is the one `start` ran."""
    shutil.copytree(start, work, symlinks=True)
    blocks = bash_blocks(page)
    ran = 1 if page == README else 0  # the quickstart ran in `after_demo`
    for body, line in blocks[ran:]:
        res = run_script(body, work)
        if res.returncode != 0:
            return ran, failure(page, line, body, res)
        ran += 1
    return ran, None


@pytest.fixture(scope="module")
def page_runs(request, after_demo: Path, tmp_path_factory) -> dict[Path, Future]:
    """Every page the session selected, started at once on WORKERS threads (each page in its own copy)."""
    wanted = [
        item.callspec.params["page"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_page_commands_run_in_order"
    ]
    wanted.sort(key=commands, reverse=True)  # the longest pages first, so that the two workers end together
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    yield {
        page: pool.submit(run_page, page, after_demo, tmp_path_factory.mktemp(page.stem) / "repo") for page in wanted
    }
    pool.shutdown(cancel_futures=True)  # after a failure under -x, the pages not yet started are not run


@pytest.mark.parametrize("page", PAGES_WITH_COMMANDS, ids=lambda p: p.name)
def test_page_commands_run_in_order(page: Path, page_runs: dict[Path, Future]):
    ran, failed = page_runs[page].result()
    assert failed is None, failed
    assert ran == len(bash_blocks(page)) > 0  # every ```bash block of the page was run


def test_readme_and_docs_have_commands():
    """The walkthrough is executed (a README without ```bash blocks would pass the test above vacuously)."""
    assert len(bash_blocks(README)) > 1, "README.md has no ```bash block beyond the quickstart"
    assert len(PAGES) > 1, "docs/ has no pages"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_fence_says_whether_it_runs(page: Path):
    """A fence is ```bash (run by the test) or one of the shown kinds; an unmarked or ```sh block would hide commands."""
    odd = [(line, lang or "(none)") for lang, _, line in fences(page) if lang != RUN and lang not in SHOWN]
    assert not odd, f"{page.name}: fences must be ```bash or one of {SHOWN}: {odd}"
    fence_lines = [line for line in page.read_text().splitlines() if line.startswith("```")]
    assert len(fence_lines) % 2 == 0, f"{page.name}: an unclosed ``` fence"


def shown_launch_lines() -> list[tuple[str, int, int, str, list[str]]]:
    """(page, line, ranks, config, overrides) of each `launch local` line of a shown block naming a repo config."""
    out = []
    for page in PAGES:
        for lang, body, line in fences(page):
            if lang == RUN:
                continue
            for offset, text in enumerate(body.splitlines()):
                words = shlex.split(text.split(" #")[0]) if text.strip().startswith("launch local") else []
                if "--" not in words:
                    continue
                rest = words[words.index("--") + 1 :]
                if not rest or not (REPO / rest[0]).is_file() or not rest[0].startswith("configs/"):
                    continue
                opts = words[: words.index("--")]
                nproc = int(opts[opts.index("--nproc-per-node") + 1]) if "--nproc-per-node" in opts else 1
                nnodes = int(opts[opts.index("--nnodes") + 1]) if "--nnodes" in opts else 1
                out.append((page.name, line + 1 + offset, nproc * nnodes, rest[0], rest[1:]))
    return out


def test_shown_launch_lines_pass_the_launchers_check(after_demo: Path, monkeypatch):
    """Layouts shown for more ranks than the test starts are still configs the trainer accepts at that size."""
    from launch.preflight import config_refusal

    monkeypatch.chdir(after_demo)  # the copy's small configs and demo tokenizer; nothing is started
    lines = shown_launch_lines()
    assert lines, "no `launch local ... -- configs/...` line in a shown block"
    refused = [
        f"{page}:{line} ({ranks} ranks): {why}"
        for page, line, ranks, config, overrides in lines
        if (why := config_refusal(config, overrides, ranks)) is not None
    ]
    assert not refused, "\n".join(refused)


def config_keys() -> list[str]:
    """Every `section.key` of the config, nested sections flattened, as users write them (`checkpoint.async`)."""
    from trainer.config import Config

    def walk(cls: type, prefix: str) -> list[str]:
        keys = []
        for f in fields(cls):
            if f.name == "dims":  # the family's dimensions: listed per family in docs/models.md
                continue
            key = f.name.rstrip("_")  # a Python keyword's field: async_ is the key async
            default = f.default_factory() if f.default_factory is not MISSING else None
            keys += walk(type(default), f"{prefix}{key}.") if is_dataclass(default) else [f"{prefix}{key}"]
        return keys

    return walk(Config, "")


def test_every_config_key_is_in_the_configuration_page():
    """Each key is listed by its full name (`train.steps`), so a new key cannot land without its line."""
    page = (REPO / "docs" / "configuration.md").read_text()
    missing = [key for key in config_keys() if f"`{key}`" not in page]
    assert not missing, f"docs/configuration.md does not list {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path):
    text = FENCE.sub("", page.read_text())
    broken = [
        target
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
        if "://" not in target and not (page.parent / target).exists()
    ]
    assert not broken, f"{page.name} links to missing files: {broken}"
