"""A user's YAML that starts from a preset (`base: <preset>`), and where relative paths resolve: a user's
file against its own folder, the command line (`--set`, with a file or a preset) against the working
directory, a preset's `pkg:` paths against the package."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cyclej.config import load_config, merge_over_base, preset_path
from cyclej.errors import BadInput
from cyclej.pipeline.registry import fingerprints


def _write(path: Path, data: dict[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_merge_over_base_merges_mappings_and_replaces_everything_else() -> None:
    base = {
        "rl": {"steps": 4, "rewards": {"bleu": 0.5, "rouge": 0.5}},
        "merge": {"sweep": [0.3, 0.5]},
        "x": 1,
    }
    user = {"rl": {"rewards": {"bleu": 1.0}}, "merge": {"sweep": [0.7]}, "x": None}
    out = merge_over_base(base, user)
    assert out == {
        "rl": {"steps": 4, "rewards": {"bleu": 1.0, "rouge": 0.5}},
        "merge": {"sweep": [0.7]},
        "x": None,
    }
    assert base["rl"] == {
        "steps": 4,
        "rewards": {"bleu": 0.5, "rouge": 0.5},
    }  # the preset's mapping is not edited


def test_a_base_alone_is_the_preset(tmp_path: Path) -> None:
    """Same fingerprints as `--preset tiny`: inheriting changes nothing the user did not write."""
    mine = load_config(_write(tmp_path / "my.yaml", {"base": "tiny"}))
    assert fingerprints(mine) == fingerprints(load_config(preset="tiny"))


def test_user_keys_override_the_base_and_corpora_come_as_a_unit(tmp_path: Path) -> None:
    (tmp_path / "corpora" / "a").mkdir(parents=True)
    cfg = load_config(
        _write(
            tmp_path / "conf" / "my.yaml",
            {
                "base": "tiny",
                "name": "mine",
                "domain_a": {"name": "formal", "train": ["../corpora/a/"]},
                "rl": {"steps": 2},
            },
        )
    )
    tiny = load_config(preset="tiny")
    assert cfg.name == "mine" and cfg.rl.steps == 2
    assert cfg.rl.rollouts == tiny.rl.rollouts and cfg.models == tiny.models  # inherited
    assert cfg.domain_a.marker == tiny.domain_a.marker  # inherited inside a domain too
    # Relative to the YAML's folder, not the working directory, and not the preset's Yelp dev lines.
    assert cfg.domain_a.train == [str((tmp_path / "corpora" / "a").resolve())]
    assert cfg.domain_a.dev == []
    assert cfg.domain_b == tiny.domain_b  # a domain the user did not name stays the preset's


def test_user_storage_resolves_against_the_file_and_a_presets_against_the_working_directory(
    tmp_path: Path,
) -> None:
    cfg = load_config(_write(tmp_path / "conf" / "my.yaml", {"base": "tiny", "storage": {"root": "./store"}}))
    assert cfg.storage.root == str(tmp_path / "conf" / "store")
    assert load_config(preset="tiny").storage.root == "./cyclej-store"  # as it always was


@pytest.mark.parametrize("use_preset", [True, False])
def test_set_paths_resolve_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_preset: bool
) -> None:
    """`--set domain_a.train=[data/original.txt]` means ./data/original.txt where the command runs, with a
    preset (it used to mean cyclej/presets/data/original.txt) and with a file in another folder."""
    monkeypatch.chdir(tmp_path)
    source = (
        {"preset": "yelp"}
        if use_preset
        else {"path": _write(tmp_path / "elsewhere" / "my.yaml", {"base": "yelp"})}
    )
    cfg = load_config(**source, overrides=["domain_a.train=[data/original.txt]", "domain_b.dev=data/dev.txt"])
    assert cfg.domain_a.train == [str(tmp_path / "data" / "original.txt")]
    assert cfg.domain_b.dev == [str(tmp_path / "data" / "dev.txt")]
    # A preset's own paths are the package's, unchanged by the command line.
    assert cfg.domain_b.train[0].endswith("cyclej/samples/yelp/train.1")
    assert str(preset_path("yelp").parent) not in cfg.domain_a.train[0]


def test_an_unknown_base_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "my.yaml", {"base": "yelpp"})
    with pytest.raises(
        BadInput, match=r"my.yaml: base: 'yelpp' is not a preset \(one of tiny, demo, yelp, gptj\)"
    ):
        load_config(path)


@pytest.mark.parametrize("preset", ["demo", "yelp", "gptj"])
def test_init_writes_a_commented_config_that_inherits_the_preset(tmp_path: Path, preset: str) -> None:
    """`cyclej init` writes what a user edits (domains, markers, storage), each with a comment; the rest is
    the preset's: with the preset's own corpora filled in, every stage's fingerprint is the preset's."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    path = tmp_path / "my.yaml"
    cmd = [
        sys.executable,
        "-m",
        "cyclej.cli",
        "init",
        str(path),
        "--from",
        preset,
        "--a",
        "x/formal/",
        "--b",
        "y.txt",
    ]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# my: ") and f"base: {preset}\n" in text
    assert "\nstorage:\n" in text and "\ndomain_a:\n" in text and "\ndomain_b:\n" in text
    for key in ("  root:", "  name:", "  marker:", "  train:"):
        assert key in text and "  # " in text.split(key, 1)[1].split("\n", 1)[0], key  # with its comment
    cfg = load_config(path)
    assert (cfg.domain_a.name, cfg.domain_b.name) == ("formal", "y")
    assert cfg.domain_a.train == [str(tmp_path / "x" / "formal")]
    ref = load_config(preset=preset)
    same = yaml.safe_load(text)
    same["domain_a"] = ref.domain_a.model_dump()
    same["domain_b"] = ref.domain_b.model_dump()
    assert fingerprints(load_config(_write(tmp_path / "same.yaml", same))) == fingerprints(ref)
    again = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_translate_config_before_a_run_says_what_to_run(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = _write(tmp_path / "my.yaml", {"base": "tiny", "storage": {"root": "./store"}})
    done = subprocess.run(
        [sys.executable, "-m", "cyclej.cli", "translate", "--config", str(path), "--to", "b"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        input="x\n",
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"no finished model in {tmp_path / 'store'} (rl {fingerprints(load_config(path))['rl']}); run "
            f"`cyclej run {path}` first (`cyclej status` shows how far it got)"
        )
    )


def test_validate_refuses_corpora_too_small_for_one_context_row(tmp_path: Path) -> None:
    """240 lines a domain pass the data checks, but the 2 % held out (5 lines each) cannot fill one row of
    context.seq_len=256 tokens: `validate` says so, as the `context` stage would after Prefect started."""
    import subprocess
    import sys

    samples = Path(__file__).resolve().parents[1] / "cyclej" / "samples" / "yelp"
    for name, source in (("a.txt", "train.0"), ("b.txt", "train.1")):
        lines = (samples / source).read_text(encoding="utf-8").splitlines()[:240]
        (tmp_path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    path = _write(
        tmp_path / "my.yaml",
        {
            "base": "tiny",
            "storage": {"root": "./store"},
            "domain_a": {"train": ["a.txt"]},
            "domain_b": {"train": ["b.txt"]},
        },
    )

    def validate(*sets: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cyclej.cli", "validate", str(path), *sets],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )

    small = validate()
    assert small.returncode == 2, small.stderr
    assert small.stderr.strip().splitlines()[-1] == (
        "cyclej: error: context: the dev lines of both domains hold fewer tokens than one row of "
        "context.seq_len=256; lower context.seq_len or add text (or give dev files)"
    )
    assert validate("--set", "context.seq_len=64").returncode == 0  # what the message suggests works
    # `cyclej run --until data` runs no context stage: its launcher does not refuse the corpora for it.
    from cyclej.cli import _check_inputs

    cfg = load_config(path)
    assert _check_inputs(cfg, until="data").startswith("negative 240 lines")
    with pytest.raises(BadInput, match="fewer tokens than one row of context.seq_len=256"):
        _check_inputs(cfg, until="context")


def test_the_shakespeare_results_config_is_the_demo_preset_with_only_the_data_changed() -> None:
    """docs/results/shakespeare.yaml: the page's run. Its domains are the shipped sample (found from any
    clone through `pkg:`), its dev files line-aligned pairs for reference BLEU; every stage that does not
    read the corpora is the demo preset's, so the merge, RL and eval fingerprints differ from the demo's
    only through the data."""
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "docs" / "results" / "shakespeare.yaml")
    demo = load_config(preset="demo")
    assert cfg.eval.references and not demo.eval.references
    assert cfg.eval.model_copy(update={"references": False}) == demo.eval
    for section in ("models", "data", "context", "paraphrase", "para_train", "domain_train", "merge", "rl"):
        assert getattr(cfg, section) == getattr(demo, section), section
    sides = []
    for dom in (cfg.domain_a, cfg.domain_b):
        assert Path(dom.train[0]).is_file() and "cyclej/samples/shakespeare/" in dom.train[0]
        sides.append(Path(dom.dev[0]).read_text(encoding="utf-8").splitlines())
    assert len(sides[0]) == len(sides[1]) == 300 and all(x and y for x, y in zip(*sides, strict=True))
