"""llmscratch.runs: the one owner of the run/checkpoint folder layout, discovery and output-folder guards."""

import os

import pytest

from llmscratch import runs
from llmscratch.errors import UserError


def make_step(run, step, resumable=True):
    folder = runs.step_folder(run, step)
    folder.mkdir(parents=True)
    (folder / runs.CONFIG).write_text("{}")
    if resumable:
        (folder / runs.TRAIN_STATE).write_bytes(b"")
    return folder


def test_step_folders_are_named_sortably_and_map_back_to_their_run(tmp_path):
    folder = runs.step_folder(tmp_path / "run", 42)
    assert folder == tmp_path / "run" / "checkpoints" / "step-0000042"
    assert runs.step_of(folder) == 42
    assert runs.run_of(folder) == tmp_path / "run"
    assert runs.step_of(tmp_path / "run") is None and runs.run_of(tmp_path / "run") == tmp_path / "run"
    # a folder merely named step-N outside checkpoints/ is not a step folder
    assert runs.step_of(tmp_path / "step-0000001") is None


def test_latest_checkpoint_is_the_newest_resumable_step(tmp_path):
    assert runs.latest_checkpoint(tmp_path) is None
    make_step(tmp_path, 5)
    make_step(tmp_path, 100)
    make_step(tmp_path, 200, resumable=False)  # no train_state.pt: cannot resume from it
    (tmp_path / "checkpoints" / ".step-0000300.tmp").mkdir()  # an interrupted write
    assert runs.latest_checkpoint(tmp_path) == runs.step_folder(tmp_path, 100)
    assert [runs.step_of(p) for p in runs.checkpoints(tmp_path)] == [5, 100, 200]
    # a run folder without model files of its own resolves to its newest step folder
    assert runs.find_model_folder(tmp_path) == runs.step_folder(tmp_path, 200)


def test_prune_keeps_the_newest(tmp_path):
    for s in (1, 2, 3, 4):
        make_step(tmp_path, s)
    runs.prune_checkpoints(tmp_path, 2)
    assert [runs.step_of(p) for p in runs.checkpoints(tmp_path)] == [3, 4]
    runs.prune_checkpoints(tmp_path, 0)  # 0 keeps everything
    assert len(runs.checkpoints(tmp_path)) == 2


def test_new_step_folder_appears_only_when_complete(tmp_path):
    with pytest.raises(RuntimeError):
        with runs.new_step_folder(tmp_path, 7) as tmp:
            (tmp / runs.WEIGHTS).write_bytes(b"partial")
            raise RuntimeError("disk full")
    assert not runs.step_folder(tmp_path, 7).exists()
    # the temporary folder is gone too, and so is the checkpoints/ folder made for it
    assert not (tmp_path / "checkpoints").exists()
    with runs.new_step_folder(tmp_path, 7) as tmp:
        (tmp / runs.WEIGHTS).write_bytes(b"whole")
    assert (runs.step_folder(tmp_path, 7) / runs.WEIGHTS).read_bytes() == b"whole"


def test_find_in_run_reaches_the_run_folder_from_a_step_folder(tmp_path):
    step = make_step(tmp_path, 3)
    assert runs.find_in_run(step, runs.PROMPT_STYLE) is None
    (tmp_path / runs.PROMPT_STYLE).write_text("{}")
    assert runs.find_in_run(step, runs.PROMPT_STYLE) == tmp_path / runs.PROMPT_STYLE
    (step / runs.PROMPT_STYLE).write_text("{}")  # the step's own copy wins
    assert runs.find_in_run(step, runs.PROMPT_STYLE) == step / runs.PROMPT_STYLE


def test_model_and_adapter_folders_are_told_apart(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / runs.ADAPTER_CONFIG).write_text("{}")
    assert runs.is_adapter_folder(adapter) and runs.is_adapter_only(adapter)
    with pytest.raises(UserError, match="LoRA adapter"):
        runs.find_model_folder(adapter)
    (adapter / runs.WEIGHTS).write_bytes(b"")
    assert not runs.is_adapter_only(adapter) and runs.find_model_folder(adapter) == adapter
    with pytest.raises(UserError, match="not found"):
        runs.find_model_folder(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="got a file"):
        runs.find_model_folder(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no model.safetensors"):
        runs.find_model_folder(tmp_path / "empty")


def test_check_run_folder_guards_resume_and_overwrite(tmp_path):
    assert runs.check_run_folder(tmp_path / "new", resume=False) is False
    with pytest.raises(UserError, match="--resume: no checkpoint"):
        runs.check_run_folder(tmp_path / "new", resume=True)
    make_step(tmp_path / "run", 10)
    with pytest.raises(UserError, match="already holds a training run.*--overwrite"):
        runs.check_run_folder(tmp_path / "run", resume=False)
    assert runs.check_run_folder(tmp_path / "run", resume=False, overwrite=True) is True
    assert runs.check_run_folder(tmp_path / "run", resume=True) is False
    with pytest.raises(UserError, match="contradict"):
        runs.check_run_folder(tmp_path / "run", resume=True, overwrite=True)


def test_clear_run_removes_the_history_but_not_other_files(tmp_path):
    make_step(tmp_path, 1)
    (tmp_path / runs.METRICS_CSV).write_text("kind,step\n")
    (tmp_path / "notes.txt").write_text("mine")
    runs.clear_run(tmp_path)
    assert not runs.holds_run(tmp_path) and not (tmp_path / runs.METRICS_CSV).exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_removed_on_failure_removes_only_a_folder_it_created(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError):
        with runs.removed_on_failure(out, runs.check_out_dir(out)):
            (out / "half").write_text("x")
            raise ValueError
    assert not out.exists()
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ValueError):
        with runs.removed_on_failure(out, runs.check_out_dir(out)):
            raise ValueError
    assert (out / "keep").exists()
    with pytest.raises(UserError, match="not a folder"):
        runs.check_out_dir(out / "keep")


def test_write_folder_builds_under_a_temporary_name(tmp_path):
    out = tmp_path / "made"

    def fail(tmp):
        (tmp / "a").write_text("1")
        raise OSError("no space left on device")

    with pytest.raises(OSError):
        runs.write_folder(out, fail)
    assert not out.exists() and os.listdir(tmp_path) == []
    runs.write_folder(out, lambda tmp: (tmp / "a").write_text("1"))
    assert (out / "a").read_text() == "1"
    with pytest.raises(UserError, match="not empty.*--overwrite"):
        runs.write_folder(out, lambda tmp: None)
    assert runs.written_files(out) == ["a"]


def test_write_folder_overwrite_replaces_only_what_it_writes(tmp_path):
    out = tmp_path / "made"
    out.mkdir()
    (out / "a").write_text("old")
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "x").write_text("old")

    def write(tmp):
        (tmp / "a").write_text("new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "y").write_text("new")

    runs.write_folder(out, write, overwrite=True)
    assert (out / "a").read_text() == "new" and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "sub").iterdir()) == ["y"]  # a folder it writes is replaced whole
    assert [p.name for p in tmp_path.iterdir()] == ["made"]  # no temporary left beside it


def test_an_input_is_never_an_output(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.txt").write_text("keep")
    for guard in (lambda: runs.check_out_folder(src, overwrite=True, inputs=(src,)),
                  lambda: runs.check_run_folder(src, resume=False, overwrite=True, inputs=(None, str(src))),
                  lambda: runs.check_out_file(src / "data.txt", overwrite=True, inputs=(src / "data.txt",))):
        with pytest.raises(UserError, match="input"):
            guard()
    # a file the verb writes that would land on an input is refused before anything is replaced
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("input")
    (out / "other").write_text("x")
    with pytest.raises(UserError, match="input"):
        runs.write_folder(out, lambda tmp: [(tmp / n).write_text("new") for n in ("other", "tokenizer.json")],
                          overwrite=True, inputs=(out / "tokenizer.json",))
    assert (out / "tokenizer.json").read_text() == "input" and (out / "other").read_text() == "x"


def test_check_out_file(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        runs.check_out_file(tmp_path, overwrite=True)
    f = tmp_path / "x.json"
    f.write_text("{}")
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        runs.check_out_file(f)
    assert runs.check_out_file(f, overwrite=True) == f
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(UserError, match="symbolic link"):
        runs.check_out_file(loop, overwrite=True)


def test_run_folder_guard_refuses_a_non_empty_folder_without_overwrite(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / runs.WEIGHTS).write_bytes(b"weights")
    with pytest.raises(UserError, match="--overwrite"):
        runs.check_run_folder(out, resume=False)
    assert runs.check_run_folder(out, resume=False, overwrite=True) is True
    assert runs.check_run_folder(tmp_path / "new", resume=False) is False
    assert not (tmp_path / "new").exists()


def test_resume_removes_temporaries_of_an_interrupted_save(tmp_path):
    step = runs.step_folder(tmp_path, 2)
    step.mkdir(parents=True)
    (step / runs.TRAIN_STATE).write_bytes(b"state")
    stale = step.parent / ".step-0000004.abc123"
    stale.mkdir()
    (stale / runs.WEIGHTS).write_bytes(b"half")
    half_final = tmp_path / ".model.safetensors.x1y2.tmp"  # fileio.atomic_write's temporary name
    half_final.write_bytes(b"half")
    (tmp_path / ".mine").write_text("a hidden file of the user's")
    runs.check_run_folder(tmp_path, resume=True)
    assert not stale.exists() and not half_final.exists() and step.is_dir() and (tmp_path / ".mine").exists()


def test_removed_on_failure_removes_only_what_the_run_added(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    before = runs.check_out_dir(tmp_path)
    with pytest.raises(RuntimeError):
        with runs.removed_on_failure(tmp_path, before):
            (tmp_path / runs.METRICS_CSV).write_text("step\n")
            raise RuntimeError("bad data")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    fresh = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError):
        with runs.removed_on_failure(fresh, runs.check_out_dir(fresh)):
            raise RuntimeError("bad data")
    assert not fresh.exists()
