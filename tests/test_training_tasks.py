"""Training tasks and evaluators are chosen by name from the config; an unknown or mismatched name is a clear error
before anything is loaded."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from ip2p_jax.training import evaluators
from ip2p_jax.training.config import training_config
from ip2p_jax.training.tasks import TASKS, build_task

ROOT = Path(__file__).resolve().parents[1]


def test_an_unknown_task_is_a_value_error_naming_the_known_ones(tmp_path):
    config = training_config("ip2pp")
    with pytest.raises(ValueError, match=r"unknown task 'ip2pp' \(one of ip2p, autoencoder, clip, text_to_image\)"):
        build_task(config, tmp_path, main_process=True)
    assert not list(tmp_path.iterdir()), "nothing is written for an unknown task"


def test_every_task_has_a_module_with_build():
    for name in TASKS:
        assert callable(importlib.import_module(f"ip2p_jax.training.tasks.{name}").build), name


def _config(task: str, **eval_settings):
    config = training_config(task)
    config.data = dict(name="shapes_edit")
    config.eval = eval_settings
    return config


def test_evaluators_are_chosen_by_name_and_checked_against_the_task():
    parts = evaluators.Parts(batch=lambda rows: rows, tokenizer=None)
    assert evaluators.from_config(training_config("clip"), parts) is None, "no eval group: no evaluator"
    assert evaluators.from_config(_config("clip", name="retrieval", count=0), parts) is None, "count 0: never"
    with pytest.raises(ValueError, match=r"unknown evaluator eval.name='retreival' \(one of keyword_localisation"):
        evaluators.from_config(_config("clip", name="retreival", count=4), parts)
    with pytest.raises(ValueError, match="evaluator 'word_localisation' measures the text_to_image task, not 'clip'"):
        evaluators.from_config(_config("clip", name="word_localisation", count=4), parts)
    # keyword regions exist only in ShapesEdit: another data set has no keyword evaluation
    config = _config("ip2p", name="keyword_localisation", count=4)
    config.data.name = "synthetic"
    assert evaluators.from_config(config, parts) is None


@pytest.mark.parametrize(
    "module, variants, name",
    [
        ("shapes_ip2p", ("", "regrown"), "keyword_localisation"),
        ("shapes_t2i", ("", "regrown"), "word_localisation"),
        ("shapes_clip", ("", "from_vision"), "retrieval"),
    ],
)
def test_each_shipped_config_names_an_evaluator_of_its_task(module, variants, name):
    spec = importlib.util.spec_from_file_location(module, ROOT / "configs" / f"{module}.py")
    config_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_module)
    for variant in variants:
        config = config_module.get_config(variant)
        assert config.eval.name == name, variant
        assert config.task in evaluators.EVALUATORS[name][1], variant
    with pytest.raises(ValueError, match="unknown variant"):
        config_module.get_config("nonesuch")
