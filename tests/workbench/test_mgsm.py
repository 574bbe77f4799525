"""The MGSM loader: all 250 rows of each real file, malformed rows named by line, seeded samples."""
import pytest

from workbench.config.loader import shipped_languages_dir
from workbench.errors import DataError, HubUnavailableError
from workbench.evaluation.mgsm import load_mgsm_hub, read_mgsm_tsv, sample_items

LANGS = ("en", "sw", "te", "bn", "ja")


@pytest.mark.parametrize("lang", LANGS)
def test_reads_every_row_of_the_real_files(shared_data, lang):
    for path in (shared_data / "mgsm" / f"mgsm_{lang}.tsv", shipped_languages_dir() / "mgsm" / f"mgsm_{lang}.tsv"):
        items = read_mgsm_tsv(path)
        assert len(items) == 250
        assert items[0].answer == 18 and items[1].answer == 3  # Janet's ducks, the robe
        assert items[-1].source == f"mgsm_{lang}.tsv:250"
        assert all(item.question and "\t" not in item.question for item in items)
        assert all(isinstance(item.answer, int) for item in items)


def test_answers_with_thousands_commas(shared_data):
    answers = {item.answer for item in read_mgsm_tsv(shared_data / "mgsm" / "mgsm_en.tsv")}
    assert {114200, 2125, 276000, 5600} <= answers  # written "114,200" ... in the file


@pytest.mark.parametrize("bad,why", [("no tab at all", "1 tab-separated field"),
                                     ("question?\t12\textra", "3 tab-separated field"),
                                     ("question?\ttwelve", "2 tab-separated field"),
                                     ("\t12", "2 tab-separated field")])
def test_malformed_row_is_rejected_with_file_and_line(shared_data, tmp_path, bad, why):
    lines = (shared_data / "mgsm" / "mgsm_sw.tsv").read_text(encoding="utf-8").splitlines()[:10]
    lines[6] = bad
    path = tmp_path / "broken.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"broken\.tsv, line 7: expected question<TAB>numeric answer") as err:
        read_mgsm_tsv(path)
    assert why in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such MGSM-format file"):
        read_mgsm_tsv(tmp_path / "nope.tsv")
    (tmp_path / "empty.tsv").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no rows"):
        read_mgsm_tsv(tmp_path / "empty.tsv")


def test_sample_is_fixed_nested_and_in_file_order(shared_data):
    items = read_mgsm_tsv(shared_data / "mgsm" / "mgsm_sw.tsv")
    sixteen = sample_items(items, 16, seed=0)
    assert sixteen == sample_items(items, 16, seed=0)
    assert sixteen != sample_items(items, 16, seed=1)
    lines = [int(item.source.split(":")[1]) for item in sixteen]
    assert lines == sorted(lines) and len(set(lines)) == 16
    assert set(sample_items(items, 4, seed=0)) <= set(sixteen)  # the --fast sample is part of the full one
    assert sample_items(items, 1000, seed=0) == items


def test_hub_copy_offline_is_a_clear_error():
    with pytest.raises(HubUnavailableError, match=r"juletxara/mgsm \(sw\).*eval\.mgsm\.path.*--mgsm FILE"):
        load_mgsm_hub("juletxara/mgsm", "sw")
