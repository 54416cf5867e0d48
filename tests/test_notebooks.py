"""The chapter notebooks as files: one per chapter and bonus, outputs stripped from git, each importing the
package and drawing a figure, each listed in the README. (`make notebooks` executes them; CI runs it.)"""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "notebooks"
CHAPTERS = ["01_setup", "02_tokens", "03_attention", "04_gpt_model", "05_pretraining", "06_classification",
            "07_instruction_tuning", "A_pytorch_essentials", "D_training_loop_extras", "E_lora", "bonus_kv_cache",
            "bonus_llama_qwen", "bonus_dpo"]
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))


def code_of(path: Path) -> str:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def test_every_chapter_has_its_notebook():
    assert sorted(p.stem for p in NOTEBOOKS) == sorted(CHAPTERS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, \
                f"{path.name} cell {i} keeps its outputs; strip them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_uses_the_package_and_draws_a_figure(path):
    code = code_of(path)
    assert "llmscratch" in code, f"{path.name} does not import the package"
    assert any(s in code for s in ("plt.", "plot_attention", "plot_embeddings", "subplots(")), \
        f"{path.name} draws no figure"
    assert "class GPT(" not in code and "class GPTModel(" not in code, f"{path.name} redefines the model"


def test_the_readme_lists_every_notebook():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    learn = readme[readme.index("## Learn"):]
    missing = [p.name for p in NOTEBOOKS if p.name not in learn]
    assert not missing, f"README's Learn section does not list {missing}"
