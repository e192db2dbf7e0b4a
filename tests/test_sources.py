"""sources.py: every source built for real on SmolLM2 + GSM8K at tiny n; caching, resumption and
file-source errors."""

import json

import pytest

import sources

GEN = dict(max_new_tokens=24, batch_size=8, k=2)  # tiny, so real generation takes seconds


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch, smollm2_dir):
    monkeypatch.setattr(sources, "CACHE_DIR", tmp_path / "sources")


@pytest.mark.parametrize("source", ["human", "self", "rewrite", "teacher:smollm2-135m-instruct",
                                    "minimum-change:smollm2-135m-instruct"])
def test_each_source_builds_on_the_same_questions(source):
    records, manifest = sources.build(source, n_train=3, progress=False, **GEN)
    human, _ = sources.build("human", n_train=3, progress=False)
    assert [r["id"] for r in records] == [r["id"] for r in human]  # same questions, same order
    assert manifest["questions"] == 3 and sum(manifest["counts_by_path"].values()) == 3
    assert all(isinstance(r["response"], str) and r["response"] for r in records)
    allowed = {"human": {"ground_truth"}, "self": {"sampled", "rationalized", "ground_truth"},
               "rewrite": {"rewritten", "ground_truth"}}.get(source.split(":")[0])
    if allowed:
        assert set(manifest["counts_by_path"]) <= allowed
    if source.startswith("minimum-change"):
        assert all("original_prediction" in r for r in records)
    folder = manifest["cache_folder"]
    on_disk = json.loads(open(f"{folder}/manifest.json").read())
    assert on_disk["inputs_sha256"] == manifest["inputs_sha256"] and on_disk["source"] == source


def test_cache_is_reused_and_changed_inputs_rebuild(monkeypatch):
    first, m1 = sources.build("self", n_train=2, progress=False, **GEN)
    monkeypatch.setattr(sources, "build_chunk", lambda *a, **k: pytest.fail("rebuilt a cached set"))
    again, m2 = sources.build("self", n_train=2, progress=False, **GEN)
    assert again == first and m2 == m1
    with pytest.raises(pytest.fail.Exception):  # a different seed is a different set
        sources.build("self", n_train=2, seed=1, progress=False, **GEN)


def test_interrupted_build_resumes_without_loss_or_duplicates(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "CHUNK", 1)
    real = sources.build_chunk
    calls = []

    def dies_on_third(kind, arg, examples, *a, **k):
        calls.append(examples[0].id)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(kind, arg, examples, *a, **k)

    monkeypatch.setattr(sources, "build_chunk", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        sources.build("self", n_train=4, progress=False, **GEN)
    monkeypatch.setattr(sources, "build_chunk", lambda *a, **k: (calls.append(a[2][0].id), real(*a, **k))[1])
    resumed, manifest = sources.build("self", n_train=4, progress=False, **GEN)
    assert calls[3:] == calls[2:3] + [resumed[3]["id"]]  # only the unfinished chunks ran again
    assert [r["id"] for r in resumed] == [r["id"] for r in sources.build("human", n_train=4, progress=False)[0]]
    # identical to an uninterrupted build
    monkeypatch.setattr(sources, "CACHE_DIR", tmp_path / "fresh")
    monkeypatch.setattr(sources, "build_chunk", real)
    straight, _ = sources.build("self", n_train=4, progress=False, **GEN)
    assert straight == resumed


def paper_file(tmp_path, rows, jsonl=False):
    path = tmp_path / ("f.jsonl" if jsonl else "f.json")
    path.write_text("\n".join(json.dumps(r) for r in rows) if jsonl else json.dumps(rows))
    return path


def test_file_source_matches_paper_format(tmp_path):
    human, _ = sources.build("human", n_train=3, progress=False)
    suffix = " Please provide the final answer (a number) at the end, after 'Final Answer:'"
    rows = [{"question": r["question"] + suffix, "input": "", "answer": f"GPT-4 says... Final Answer: {r['gold']}"}
            for r in human[:2]] + [{"question": "Not a GSM8K question at all?", "input": "", "answer": "1"}]
    records, manifest = sources.build(f"file:{paper_file(tmp_path, rows)}", n_train=3, progress=False)
    assert [r["id"] for r in records] == [r["id"] for r in human[:2]]
    assert manifest["questions_without_file_answer"] == 1 and manifest["file_rows_not_in_task"] == 1
    assert manifest["file_rows_not_in_task_first"] == [3]


@pytest.mark.parametrize("content,needle", [
    ('{"question": "a", "answer": "b"}\n{"question": "c", "answer": \n', r"f.jsonl:2: invalid JSON"),
    ('{"question": "a", "answer": "b"}\n{"question": "c"}\n', r"line 2 has no string 'answer'"),
    ("", "the file is empty"),
    ("\n\n", "the file is empty"),
])
def test_malformed_file_source_is_one_clear_line(tmp_path, content, needle):
    path = tmp_path / "f.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=needle) as e:
        sources.build(f"file:{path}", n_train=2, progress=False)
    assert "\n" not in str(e.value)


def test_unknown_source_and_cli_error(capsys):
    with pytest.raises(ValueError, match="unknown source 'gpt4'"):
        sources.build("gpt4", n_train=2)
    with pytest.raises(SystemExit) as e:
        sources.main(["--source", "file:/nonexistent.json", "--n-train", "2"])
    assert "error: file source /nonexistent.json does not exist" in str(e.value)
