"""Data readers that ``dharma.hooks`` plugins add through the ``dharma_data_readers`` hook."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakedists import install, run_dharma

from dharma_kernel.data import DataReport, read_records
from dharma_kernel.errors import DharmaError
from dharma_kernel.hookspecs import hookimpl
from dharma_kernel.plugins import get_plugin_manager


class SutraReader:
    """A new format: a ``SUTRA`` header line, then one sutra a line."""

    name = "sutra"
    suffixes = (".sutra",)

    def sniff(self, path: Path) -> bool:
        return path.read_text().startswith("SUTRA\n")

    def read(self, path: Path):
        for line in path.read_text().splitlines()[1:]:
            yield {"text": line, "tags": ["sutra"]} if line != "?" else {"tags": ["sutra"]}


class ShoutingTextReader:
    """Takes over ``.txt`` files that ask for it; the others stay with the built-in reader."""

    suffixes = (".txt",)

    def sniff(self, path: Path) -> bool:
        return "SHOUT" in path.read_text()

    def read(self, path: Path):
        yield {"text": path.read_text().upper()}


class FailingReader:
    suffixes = (".fail",)

    def sniff(self, path: Path) -> bool:
        return True

    def read(self, path: Path):
        yield {"text": "read before the failure"}
        raise RuntimeError("disk on fire")


class Hooks:
    @hookimpl
    def dharma_data_readers(self):
        return [SutraReader(), ShoutingTextReader(), FailingReader()]


@pytest.fixture
def hooks():
    manager, plugin = get_plugin_manager(), Hooks()
    manager.register(plugin, name="test-data-readers")
    yield
    manager.unregister(plugin)


def test_a_plugin_reader_reads_its_own_format_checked_like_jsonl(hooks, tmp_path):
    path = tmp_path / "yoga.sutra"
    path.write_text("SUTRA\natha yoga anushasanam\n?\nyogash chitta vritti nirodhah\n")
    report = DataReport()

    records = read_records([path], report=report)

    assert [(r.index, r.text, r.tags, r.source) for r in records] == [
        (1, "atha yoga anushasanam", ("sutra",), str(path)),
        (3, "yogash chitta vritti nirodhah", ("sutra",), str(path)),
    ]
    assert report.problems == [(str(path), 2, "needs a 'text' or a 'messages' field")]


def test_plugin_readers_are_asked_before_the_built_in_ones(hooks, tmp_path):
    (tmp_path / "a.txt").write_text("please SHOUT this")
    (tmp_path / "b.txt").write_text("quiet paragraph\n\nanother")

    assert [r.text for r in read_records([tmp_path])] == ["PLEASE SHOUT THIS", "quiet paragraph", "another"]


def test_a_plugin_reader_that_raises_skips_its_file_whole(hooks, tmp_path):
    (tmp_path / "x.fail").write_text("anything")
    (tmp_path / "y.txt").write_text("still read")
    report = DataReport()

    assert [r.text for r in read_records([tmp_path], report=report)] == ["still read"]
    assert report.problems == [
        (str(tmp_path / "x.fail"), 0, "reader FailingReader failed on it: RuntimeError: disk on fire")
    ]
    assert (report.files_read, report.files_skipped, report.records_read) == (1, 1, 1)
    with pytest.raises(DharmaError, match="x.fail: reader FailingReader failed on it"):
        read_records([tmp_path], strict=True)


READER_PLUGIN = """
from dharma_kernel.hookspecs import hookimpl


class VerseLines:
    suffixes = (".verses",)

    def sniff(self, path):
        return True

    def read(self, path):
        for line in path.read_text(encoding="utf-8").splitlines():
            yield {"text": line, "tags": ["verse"]}


@hookimpl
def dharma_data_readers():
    return [VerseLines()]
"""

READ = """
import json, sys
from dharma_kernel.data import read_records
records = read_records([sys.argv[1]])
print(json.dumps({"texts": [r.text for r in records], "torch": "torch" in sys.modules}))
"""


def test_an_installed_hook_plugin_is_discovered_and_reading_never_imports_torch(tmp_path):
    install(tmp_path, "dharma-verse-lines", {"dharma.hooks": {"verses": "dharma_verse_lines"}},
            {"dharma_verse_lines": READER_PLUGIN})  # fmt: skip
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.verses").write_text("सत्यमेव जयते\nअहिंसा परमो धर्मः\n", encoding="utf-8")
    (data / "b.jsonl").write_text(json.dumps({"text": "from jsonl"}))

    result = run_dharma(tmp_path, code=READ.replace("sys.argv[1]", repr(str(data))))

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "texts": ["सत्यमेव जयते", "अहिंसा परमो धर्मः", "from jsonl"],
        "torch": False,
    }
