"""Bad input to every command line is one line that says what is wrong and what to do, exit code
non-zero, no traceback, and it comes before the work (nothing is evaluated or written first)."""

import json
import shutil

import pytest

import eval as ev
import generation
import perplexity
from model import ModelConfig, ModelLoadError
from tokenizer import Tokenizer


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "afile"
    path.write_text("x")
    return path


def error_of(main, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code not in (0, None)
    return str(e.value)


@pytest.mark.parametrize("main,argv,needle", [
    (ev.main, ["--n", "0"], "--n must be at least 1; got 0"),
    (ev.main, ["--batch-size", "-3"], "--batch-size must be at least 1; got -3"),
    (ev.main, ["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (ev.main, ["humaneval-selfcheck", "--limit", "0"], "--limit must be at least 1"),
    (ev.main, ["humaneval-selfcheck", "--timeout", "nan"], "--timeout must be a finite number of seconds > 0"),
    (perplexity.main, ["--batch-size", "-1"], "--batch-size must be at least 1"),
    (perplexity.main, ["--n", "0"], "--n must be at least 1"),
    (generation.main, ["--prompt", ""], "--prompt is empty"),
    (generation.main, ["--prompt", "hi", "--max-new-tokens", "-1"], "--max-new-tokens must be at least 1"),
    (generation.main, ["--prompt", "hi", "--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (generation.main, ["--prompt", "hi", "--temperature", "0.7", "--top-p", "0"], "--top-p must be in (0, 1]; got 0.0"),
])
def test_bad_numbers_are_one_line_errors(main, argv, needle):
    assert needle in error_of(main, argv)


def test_an_unusable_output_path_fails_before_the_work(a_file, tmp_path, monkeypatch):
    import pretrained
    monkeypatch.setattr(pretrained, "resolve_model", lambda name: pytest.fail("loaded a model first"))
    assert "is a file, not a folder" in error_of(ev.main, ["--out", str(a_file / "ev")])
    assert "is a file, not a folder" in error_of(ev.main, ["report", str(tmp_path), "--out", str(a_file)])
    assert "is a folder; give a file name" in error_of(perplexity.main, ["--out", str(tmp_path)])
    assert "is a file, not a folder" in error_of(perplexity.main, ["--out", str(a_file / "p.json")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing written, no temp files


@pytest.mark.parametrize("content,needle", [
    ([1, 2], "is not a JSON object of config fields"),
    ({"hidden_size": "576"}, "hidden_size must be a number, got '576'"),
    ({"rms_norm_eps": None}, "rms_norm_eps must be a number, got None"),
])
def test_a_malformed_config_is_a_load_error(content, needle, tmp_path, smollm2_dir):
    good = json.loads((smollm2_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(content if isinstance(content, list) else {**good, **content}))
    with pytest.raises(ModelLoadError, match=needle):
        ModelConfig.from_json(tmp_path / "config.json")


def test_a_damaged_tokenizer_is_one_clear_error(tmp_path, smollm2_dir):
    shutil.copy(smollm2_dir / "tokenizer_config.json", tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((smollm2_dir / "tokenizer.json").read_bytes()[:5000])
    with pytest.raises(ValueError, match="tokenizer.json .*the file is damaged"):
        Tokenizer.from_folder(str(tmp_path))


def test_report_on_a_folder_that_is_not_a_trained_run(tmp_path):
    base = tmp_path / "base-m-n32"
    base.mkdir()
    (base / "results.json").write_text(json.dumps({"model": "m", "test": {}}))
    assert "is not a trained run's results (no source, task, perplexity)" in error_of(ev.main, ["report", str(base)])
    (base / "results.json").write_text("[]")
    assert "is not a trained run's results" in error_of(ev.main, ["report", str(base)])


def test_show_on_an_evaluation_only_task():
    import sources
    assert "--task csqa has no training split" in error_of(sources.main, ["show", "--task", "csqa"])


def test_a_file_in_the_way_of_the_model_cache(a_file, monkeypatch):
    import pretrained
    monkeypatch.setenv("ILB_CACHE", str(a_file))
    assert "a file is in the way" in error_of(pretrained.main, ["smollm2-135m-instruct"])


@pytest.mark.parametrize("field,value,needle", [("r", 0, "rank r must be positive"),
                                                ("dropout", 1.0, "dropout must be in"),
                                                ("alpha", float("nan"), "alpha must be a finite number")])
def test_lora_settings_that_cannot_work(field, value, needle):
    from lora import LoRAConfig
    with pytest.raises(ValueError, match=needle):
        LoRAConfig(**{field: value})
