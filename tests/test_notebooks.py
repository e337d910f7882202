"""The notebooks in colab/ are stored clean and run top to bottom in a real kernel.

Each notebook is executed with nbclient at tiny size on the CPU: the cell after the one
tagged ``parameters`` is replaced by the overrides below (as papermill does), and any
error in any cell fails the test. The structure a Colab user depends on is checked too:
the "Open in Colab" badge points at the notebook itself, the install cell installs from
the repository (never a local path) and prints the accelerator, and no outputs are stored.
"""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
REPO = "github.com/jaxdiff/jaxdiff"
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
INSTALL_TARGET = f"jaxdiff @ git+https://{REPO}"


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """Converted tiny DiTs (p2 main, p4 guide) and SD-VAE from the upstream goldens."""
    from test_pretrained_convert import golden_state_dict

    from jaxdiff.pretrained.convert import convert

    folder = tmp_path_factory.mktemp("weights")
    files = {}
    for name, key, overrides in (
        ("dit_p2_sigma", "MODEL", {"num_heads": 4}),  # width 32 is no published size
        ("dit_p4_eps", "GUIDE", {"num_heads": 2}),
        ("vae_tiny", "VAE", {"norm_num_groups": 4}),
    ):
        src, _, _ = golden_state_dict(name, folder)
        files[key] = str(folder / f"{name}.safetensors")
        convert(str(src), files[key], overrides=overrides)
    return files


def tiny_overrides(name: str, tmp_path: Path, teacher: Path, request) -> dict:
    """The parameter values each notebook runs with in the suite (every key must exist)."""
    if name == "pretrained.ipynb":  # converting the goldens costs seconds: only here
        return {**request.getfixturevalue("tiny_weights"), "LABELS": [1, 2], "STEPS": 2}
    return {
        "quickstart.ipynb": {
            "WORKDIR": str(tmp_path / "run"),
            "NUM_STEPS": 5,
            "MODEL_CHANNELS": 8,
            "GRID_SIZE": 0,
            "NUM_SAMPLES": 10,
        },
        "distillation.ipynb": {
            "TEACHER": str(teacher),
            "FDISTILL_STEPS": 2,  # critic updates only: a generator update compiles ~10 s more
            "CONSISTENCY_STEPS": 2,
            "FDISTILL_DIR": str(tmp_path / "fdistill"),
            "CONSISTENCY_DIR": str(tmp_path / "consistency"),
            "EVAL_SAMPLES": 20,
        },
        "custom_sampler.ipynb": {"STEP_COUNTS": [16, 32, 64], "BATCH": 4, "RUN": str(teacher)},
        "guidance.ipynb": {
            "TEACHER": str(teacher),
            "GUIDE": str(teacher),  # autoguidance by the run itself: nothing trains
            "CLASSIFIER": "",  # no classifier-guidance row: training one costs ~10 s even tiny
            "STEPS": 2,
            "NUM_SAMPLES": 20,  # two per class, so c-VSG has a same-class sample to push from
            "SWEEP_SAMPLES": 10,
            "SCALES": [1.0, 3.0],
        },
    }[name]


def _load(path):
    return json.loads(path.read_text())


def _code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _source(cell):
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def _tagged(nb, tag):
    return [c for c in nb["cells"] if tag in c.get("metadata", {}).get("tags", [])]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_clean(path):
    nb = _load(path)
    for cell in _code_cells(nb):
        assert not cell.get("outputs"), f"{path.name} is stored with outputs: clear them"
        assert cell.get("execution_count") is None, f"{path.name}: clear execution counts"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_in_colab_and_installs_from_the_repository(path):
    nb = _load(path)
    first = _source(nb["cells"][0])
    assert nb["cells"][0]["cell_type"] == "markdown"
    badge_link = f"https://colab.research.google.com/{REPO.replace('.com', '')}/blob/main/colab/"
    assert COLAB_BADGE in first and f"({badge_link}{path.name})" in first, (
        f"{path.name}: the first cell needs the Open-in-Colab badge linking {badge_link}{path.name}"
    )
    (install,) = _tagged(nb, "install")
    assert install is _code_cells(nb)[0], f"{path.name}: the install cell must come first"
    src = _source(install)
    assert INSTALL_TARGET in src and "pip" in src, f"{path.name}: install from the repo URL"
    assert "-e ." not in src and "pip install ." not in src, "no local-path installs"
    assert "jax[cuda12]" in src and "jax[tpu]" in src and "default_backend()" in src
    # One install cell for all notebooks: a fix to it is made everywhere.
    quickstart = _tagged(_load(ROOT / "colab" / "quickstart.ipynb"), "install")[0]
    assert src == _source(quickstart), f"{path.name}: install cell differs from quickstart's"
    (params,) = _tagged(nb, "parameters")
    assert params is _code_cells(nb)[1], f"{path.name}: the parameter cell follows install"


EXPECTED = {"quickstart", "guidance", "distillation", "custom_sampler", "pretrained"}


def test_every_notebook_is_covered(tmp_path):
    assert {p.stem for p in NOTEBOOKS} == EXPECTED
    for path in NOTEBOOKS:  # each needs its own tiny parameters (pretrained's are fixtures)
        if path.name != "pretrained.ipynb":
            assert tiny_overrides(path.name, tmp_path, tmp_path, None), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_at_tiny_size(path, tmp_path, trained_run, request):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    overrides = tiny_overrides(path.name, tmp_path, trained_run, request)
    params = _tagged(nb, "parameters")[0]
    declared = {line.split("=")[0].strip() for line in params.source.splitlines() if "=" in line}
    missing = set(overrides) - declared
    assert not missing, f"{path.name}: the parameter cell does not declare {sorted(missing)}"
    position = nb.cells.index(params) + 1
    lines = [f"{k} = {v!r}" for k, v in overrides.items()]
    nb.cells.insert(position, nbformat.v4.new_code_cell("\n".join(lines)))
    # The kernel starts outside the clone, as on Colab: everything comes from the install.
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()
    client = NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(run_dir)}}
    )
    client.execute()
    printed = [o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any(" x " in text and "jax " in text for text in printed), "no accelerator line"


def test_the_repository_url_is_the_packages():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["url"] == f"https://{REPO}", "notebooks install from setup.cfg's url"
