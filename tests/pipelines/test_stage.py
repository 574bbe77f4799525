"""Stage keys: equal inputs give the same directory; a change in any input gives another; records are atomic;
a forced rerun starts from an empty folder, an interrupted stage keeps its work in progress."""
from workbench.config.loader import load_language
from workbench.pipelines.stage import fingerprint, stage_for


def test_fingerprint_is_order_independent_and_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1.0})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    a = load_language("sw").profile.corpus
    b = load_language("sw", overrides=["corpus.block_size=128"]).profile.corpus
    assert fingerprint(a) == fingerprint(load_language("sw").profile.corpus)
    assert fingerprint(a) != fingerprint(b)


def test_stage_done_only_after_finish(tmp_path):
    stage = stage_for(tmp_path, "corpus", {"x": 1})
    assert not stage.done
    stage.start()
    (stage.path / "data.txt").write_text("partial")
    assert not stage.done  # work in progress is not a finished stage
    stage.finish({"data": "data.txt"}, tokens=10)
    again = stage_for(tmp_path, "corpus", {"x": 1})
    assert again.done and again.path == stage.path
    assert again.record()["outputs"] == {"data": "data.txt"} and again.record()["tokens"] == 10
    assert not stage_for(tmp_path, "corpus", {"x": 2}).done


def test_a_fresh_start_empties_the_folder_and_a_plain_one_keeps_work_in_progress(tmp_path):
    stage = stage_for(tmp_path, "language_expert", {"x": 1})
    stage.start()
    (stage.path / "checkpoints").mkdir()
    stage.start()  # an interrupted stage resumes from what it left
    assert (stage.path / "checkpoints").is_dir() and not stage.done
    stage.finish({})
    stage.start(fresh=True)  # a forced rerun starts over
    assert list(stage.path.iterdir()) == [] and not stage.done
