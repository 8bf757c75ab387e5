"""Reading URL lists in every supported layout, and the errors for bad ones (no Ray)."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DataConfig
from pipeline.resume import make_plan
from pipeline.sources import InputError, list_input_files, read_file
from pipeline.staging import stage_file
from storage import Folder

ROWS = [
    ("http://a.example/1.jpg", "a red car"),
    ("http://a.example/2.jpg", "a blue sky"),
    ("http://a.example/3.jpg", "un café"),
]


def read_all(data: DataConfig) -> pa.Table:
    return pa.concat_tables([b for f in list_input_files(data) for b in read_file(f, data)])


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "json", "jsonl"])
@pytest.mark.parametrize("gz", [False, True])
def test_every_format_reads_to_the_same_rows(tmp_path, fmt, gz):
    path = tmp_path / f"list.{fmt}{'.gz' if gz else ''}"
    table = pa.table({"link": [u for u, _ in ROWS], "text": [c for _, c in ROWS], "score": [0.1, 0.2, 0.3]})
    if fmt == "parquet":
        import io

        buf = io.BytesIO()
        pq.write_table(table, buf)
        raw = buf.getvalue()
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        raw = (
            "link"
            + sep
            + "text"
            + sep
            + "score\n"
            + "".join(f"{u}{sep}{c}{sep}{s}\n" for (u, c), s in zip(ROWS, [0.1, 0.2, 0.3]))
        ).encode()
    elif fmt == "jsonl":
        raw = "".join(
            json.dumps({"link": u, "text": c, "score": s}) + "\n" for (u, c), s in zip(ROWS, [0.1, 0.2, 0.3])
        ).encode()
    else:
        raw = json.dumps([{"link": u, "text": c, "score": s} for (u, c), s in zip(ROWS, [0.1, 0.2, 0.3])]).encode()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    data = DataConfig(input=str(path), url_col="link", caption_col="text", extra_cols=["score"])
    out = read_all(data)
    assert out.column_names == ["url", "caption", "caption_ok", "source_error", "score"]
    assert out.column("source_error").null_count == 3
    assert out.column("url").to_pylist() == [u for u, _ in ROWS]
    assert out.column("caption").to_pylist() == [c for _, c in ROWS]
    assert out.column("caption_ok").to_pylist() == [True] * 3
    assert [float(x) for x in out.column("score").to_pylist()] == [0.1, 0.2, 0.3]


def test_headerless_tsv_uses_the_given_column_names(tmp_path):
    """CC3M's Train_GCC-training.tsv: caption<TAB>url, no header; captions hold bare quotes."""
    (tmp_path / "cc3m.tsv").write_text('a "quoted" caption\thttp://x.example/1.jpg\nplain\thttp://x.example/2.jpg\n')
    data = DataConfig(input=str(tmp_path / "cc3m.tsv"), columns=["caption", "url"])
    out = read_all(data)
    assert out.column("caption").to_pylist() == ['a "quoted" caption', "plain"]
    assert out.column("url").to_pylist() == ["http://x.example/1.jpg", "http://x.example/2.jpg"]


def test_non_utf8_and_empty_captions_are_kept_and_flagged(tmp_path):
    (tmp_path / "l.tsv").write_bytes(b"url\tcaption\nhttp://a/1\tfine\nhttp://a/2\tbad \xff\xfe\nhttp://a/3\t\n")
    out = read_all(DataConfig(input=str(tmp_path / "l.tsv")))
    assert out.column("caption_ok").to_pylist() == [True, False, True]
    assert out.column("caption").to_pylist()[1] == "bad \ufffd\ufffd"
    assert out.column("caption").to_pylist()[2] == ""


def test_non_string_json_captions_are_flagged(tmp_path):
    lines = [
        {"url": "http://a/1", "caption": 42},
        {"url": "http://a/2", "caption": None},
        {"url": "http://a/3", "caption": ["x"]},
        {"url": "http://a/4", "caption": "ok"},
    ]
    (tmp_path / "l.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    out = read_all(DataConfig(input=str(tmp_path / "l.jsonl")))
    assert out.column("caption_ok").to_pylist() == [False, False, False, True]
    assert out.column("caption").to_pylist()[0] == "42"


def test_folder_and_glob_inputs_list_files_in_order(tmp_path):
    for name in ("b.tsv", "a.tsv", "sub/c.tsv.gz", "_SUCCESS", ".hidden.tsv", "notes.md"):
        p = tmp_path / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(gzip.compress(b"url\tcaption\n") if name.endswith(".gz") else b"url\tcaption\n")
    files = list_input_files(DataConfig(input=str(tmp_path)))
    assert [f.url.rsplit("/", 1)[-1] for f in files] == ["a.tsv", "b.tsv", "c.tsv.gz"]
    assert files[2].compression == "gzip"
    files = list_input_files(DataConfig(input=str(tmp_path / "*.tsv")))
    assert [f.url.rsplit("/", 1)[-1] for f in files] == ["a.tsv", "b.tsv"]


def test_missing_column_is_a_clear_error(tmp_path):
    pq.write_table(pa.table({"url": ["http://a/1"], "text": ["x"]}), tmp_path / "urls.parquet")
    data = DataConfig(input=str(tmp_path / "urls.parquet"), caption_col="caption")
    with pytest.raises(
        InputError,
        match=r"data.caption_col 'caption' is not a column of .*urls.parquet "
        r"\(columns: url, text\)",
    ):
        read_all(data)
    data = DataConfig(input=str(tmp_path / "urls.parquet"), caption_col="text", extra_cols=["uid"])
    with pytest.raises(InputError, match=r"data.extra_cols \['uid'\]"):
        read_all(data)


def test_empty_and_unreadable_inputs_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_input_files(DataConfig(input=str(tmp_path / "nope.parquet")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no URL list"):
        list_input_files(DataConfig(input=str(tmp_path / "empty")))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="broken.parquet cannot be read as parquet"):
        read_all(DataConfig(input=str(tmp_path / "broken.parquet")))
    # A text file none of whose lines is a row (here: gzip bytes without a .gz name) is unreadable as a whole.
    (tmp_path / "packed.tsv").write_bytes(gzip.compress(b"http://a/1\tx\n" * 50))
    with pytest.raises(InputError, match=r"packed.tsv: none of its \d+ row\(s\) can be read as tsv"):
        read_all(DataConfig(input=str(tmp_path / "packed.tsv"), columns=["url", "caption"]))
    (tmp_path / "nojson.jsonl").write_text("url,caption\nhttp://a/1,x\n")
    with pytest.raises(InputError, match=r"nojson.jsonl: none of its 2 row\(s\) can be read as jsonl"):
        read_all(DataConfig(input=str(tmp_path / "nojson.jsonl")))
    (tmp_path / "broken.json").write_text('[{"url": "http://a/1", "caption": "x"}, {"url": ')
    with pytest.raises(InputError, match="broken.json cannot be read as json"):
        read_all(DataConfig(input=str(tmp_path / "broken.json")))
    with pytest.raises(InputError, match="data.input is not set"):
        list_input_files(DataConfig())


def test_staging_splits_files_into_fixed_shards_with_stable_keys(tmp_path):
    for i, n in enumerate([7, 3]):
        (tmp_path / f"part{i}.tsv").write_text(
            "url\tcaption\n" + "".join(f"http://a/{i}/{r}\tc{r}\n" for r in range(n))
        )
    data = DataConfig(input=str(tmp_path / "*.tsv"), output=str(tmp_path / "out"), rows_per_shard=3)
    out = Folder(data.output)
    staged = [stage_file(i, f, data, out) for i, f in enumerate(list_input_files(data))]
    plan = make_plan(data, staged)
    assert [s.rows for s in plan.shards] == [3, 3, 1, 3]  # shards never span files
    assert [s.name for s in plan.shards] == ["00000", "00001", "00002", "00003"]
    assert [s.first_row for s in plan.shards] == [0, 3, 6, 0]
    assert plan.shards[1].key(2) == "000012"
    assert out.read_arrow(plan.shards[2].input).column("url").to_pylist() == ["http://a/0/6"]
    again = make_plan(data, [stage_file(i, f, data, out) for i, f in enumerate(list_input_files(data))])
    assert again.to_json() == plan.to_json()


MESSY_CSV = (
    b"url,caption,uid\n"
    b"http://a/1,one,u1\n"  # line 2
    b"http://a/2,two,u2,extra\n"  # line 3: 4 fields
    b"\n"  # line 4: blank, not a row
    b'http://a/3,"three, quoted",u3\n'  # line 5
    b'http://a/4,"unterminated,u4\n'  # line 6: bad quoting
    b'http://a/5,"a"b,u5\n'  # line 7: text after a closing quote
    b"http://\xff\xfe/6,six,u6\n"  # line 8: url not UTF-8
    b"http://a/7,caf\xe9,u7\n"  # line 9: caption not UTF-8 (a filter's business)
    b"only-one-field\n"  # line 10: 1 field
    b"http://a/9,nine,u9\r\n"
)  # line 11: CRLF


def test_malformed_csv_lines_become_rows_that_name_file_and_line(tmp_path):
    (tmp_path / "messy.csv").write_bytes(MESSY_CSV)
    data = DataConfig(input=str(tmp_path / "messy.csv"), extra_cols=["uid"])
    out = read_all(data)
    assert out.num_rows == 9  # every non-blank line after the header is a row
    errors = out.column("source_error").to_pylist()
    bad = {i: e for i, e in enumerate(errors) if e is not None}
    assert sorted(bad) == [1, 3, 4, 5, 7]
    path = str(tmp_path / "messy.csv")
    assert bad[1].startswith(f"{path} line 3: 4 field(s), expected 3 (url, caption, uid)")
    assert bad[3].startswith(f"{path} line 6: bad quoting")
    assert bad[4].startswith(f"{path} line 7: bad quoting")
    assert bad[5].startswith(f"{path} line 8: the url is not valid UTF-8")
    assert bad[7].startswith(f"{path} line 10: 1 field(s), expected 3")
    good = [i for i in range(9) if i not in bad]
    assert [out.column("url")[i].as_py() for i in good] == ["http://a/1", "http://a/3", "http://a/7", "http://a/9"]
    assert [out.column("caption")[i].as_py() for i in good] == ["one", "three, quoted", "caf\ufffd", "nine"]
    assert [out.column("caption_ok")[i].as_py() for i in good] == [True, True, False, True]
    assert [out.column("uid")[i].as_py() for i in good] == ["u1", "u3", "u7", "u9"]


def test_block_size_and_parser_path_do_not_change_what_is_read(tmp_path, monkeypatch):
    """pyarrow's fast path and the line-by-line path agree, and where blocks end does not matter."""
    import pipeline.sources.delimited as sources

    rows = "".join(f'http://a/{i}\tcaption {i} "quoted"\tu{i}\n' for i in range(300))
    (tmp_path / "clean.tsv").write_text("url\tcaption\tuid\n" + rows)
    (tmp_path / "messy.csv").write_bytes(MESSY_CSV * 3)
    for name in ("clean.tsv", "messy.csv"):
        data = DataConfig(input=str(tmp_path / name), extra_cols=["uid"])
        reference = read_all(data)
        monkeypatch.setattr(sources, "BLOCK_BYTES", 64)
        small_blocks = read_all(data)
        monkeypatch.setattr(sources, "_parse_block_fast", lambda *a: None)
        slow = read_all(data)
        monkeypatch.undo()
        assert small_blocks.equals(reference) and slow.equals(reference), name
    assert reference.num_rows - reference.column("source_error").null_count == 3 * 5  # (repeated headers are rows)


MULTILINE_CSV = (
    b"url,caption,uid\n"
    b'http://a/1,"first line\nsecond line",u1\n'  # lines 2-3: one row
    b"http://a/2,two,u2\n"  # line 4
    b'http://a/3,"with a blank line\r\n\r\nand ""quotes""",u3\r\n'  # lines 5-7, CRLF
    b'http://a/4,"stray quote,u4\n'  # line 8: never closes...
    b"http://a/5,five,u5\n"  # line 9: ...so this one is its own row
    b'http://a/6,"closes, but then",u6\n'  # line 10
    b'http://a/7,"opens\nhttp://a/8,"x",u8\n'  # line 11: its quote never closes;
    b"http://a/9,nine,u9\n"
)  # line 12 is a row, line 13 too


def test_a_quoted_csv_field_may_span_lines(tmp_path):
    """As pandas/pyarrow read it, with a stray quote kept to its own line (not swallowing the file)."""
    (tmp_path / "multi.csv").write_bytes(MULTILINE_CSV)
    data = DataConfig(input=str(tmp_path / "multi.csv"), extra_cols=["uid"])
    out = read_all(data)
    errors = out.column("source_error").to_pylist()
    assert out.column("uid").to_pylist() == ["u1", "u2", "u3", None, "u5", "u6", None, "u8", "u9"]
    assert out.column("caption").to_pylist()[:3] == [
        "first line\nsecond line",
        "two",
        'with a blank line\r\n\r\nand "quotes"',
    ]
    path = str(tmp_path / "multi.csv")
    bad = {i: e for i, e in enumerate(errors) if e is not None}
    assert sorted(bad) == [3, 6]
    # line 8's quote would close on line 11, but lines 8-11 are not one valid row
    assert bad[3].startswith(f"{path} line 8: bad quoting")
    assert bad[6].startswith(f"{path} line 11: bad quoting")
    assert out.num_rows == 9


def test_a_multi_line_field_across_block_ends_reads_the_same(tmp_path, monkeypatch):
    import pipeline.sources.delimited as sources

    (tmp_path / "multi.csv").write_bytes(MULTILINE_CSV * 3)
    data = DataConfig(input=str(tmp_path / "multi.csv"), extra_cols=["uid"])
    reference = read_all(data)
    for block_bytes in (48, 64, 100, 160):  # blocks of a few lines (not less than the longest line)
        monkeypatch.setattr(sources, "BLOCK_BYTES", block_bytes)
        assert read_all(data).equals(reference), block_bytes
    monkeypatch.setattr(sources, "MAX_RECORD_LINES", 2)  # a row may span at most 2 lines now
    capped = read_all(data)
    assert capped.column("uid").to_pylist()[:3] == ["u1", "u2", None]  # the 3-line row is not read whole


def test_malformed_json_lines_become_rows_that_name_file_and_line(tmp_path):
    lines = [
        b'{"url": "http://a/1", "caption": "one"}',  # line 1
        b'{"url": "http://a/2", "caption": "two"',  # line 2: not JSON
        b"",  # line 3: blank
        b"[1, 2]",  # line 4: not an object
        b'{"url": "http://a/5", "caption": "f\xffve"}',  # line 5: caption not UTF-8
        b'{"url": "http://a/\xff6", "caption": "six"}',  # line 6: url not UTF-8
        b'{"caption": "no url"}',  # line 7: a row without a URL
        b'{"url": "http://a/8", "caption": "eight"}',
    ]  # line 8
    (tmp_path / "l.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = read_all(DataConfig(input=str(tmp_path / "l.jsonl")))
    assert out.num_rows == 7
    errors = out.column("source_error").to_pylist()
    path = str(tmp_path / "l.jsonl")
    assert errors[1].startswith(f"{path} line 2: not JSON")
    assert errors[2].startswith(f"{path} line 4: a JSON list, not an object")
    assert errors[4].startswith(f"{path} line 6: the url is not valid UTF-8")
    assert [errors[i] for i in (0, 3, 5, 6)] == [None] * 4
    assert out.column("caption_ok").to_pylist()[3] is False
    assert out.column("url").to_pylist()[5] is None  # rejected as invalid_url by the download


def test_parquet_null_url_stays_a_row(tmp_path):
    pq.write_table(pa.table({"url": ["http://a/1", None], "caption": ["x", "y"]}), tmp_path / "u.parquet")
    out = read_all(DataConfig(input=str(tmp_path / "u.parquet")))
    assert out.column("url").to_pylist() == ["http://a/1", None]
    assert out.column("source_error").to_pylist() == [None, None]


def test_verify_hash_column_is_read_normalised_or_named_when_missing(tmp_path):
    pq.write_table(
        pa.table(
            {
                "url": ["http://a/1", "http://a/2", "http://a/3"],
                "caption": ["a", "b", "c"],
                "sha256": [" ABCDEF ", None, "0123"],
            }
        ),
        tmp_path / "pool.parquet",
    )
    data = DataConfig(input=str(tmp_path / "pool.parquet"), verify_hash={"column": "sha256"})
    out = read_all(data)
    assert out.column("expected_hash").to_pylist() == ["abcdef", None, "0123"]
    assert "sha256" not in out.column_names  # read for the check, not carried (it names an output column)
    (tmp_path / "list.csv").write_text("url,caption\nhttp://a/1,a\n")
    with pytest.raises(InputError, match="data.verify_hash.column 'sha256' is not a column of"):
        read_all(DataConfig(input=str(tmp_path / "list.csv"), verify_hash=["sha256", "sha256"]))


def test_bbox_column_is_read_from_lists_or_json_text_and_bad_values_are_malformed_rows(tmp_path):
    pq.write_table(
        pa.table(
            {
                "url": ["http://a/1", "http://a/2", "http://a/3"],
                "caption": ["a", "b", "c"],
                "face_bboxes": [[[0.1, 0.2, 0.3, 0.4]], None, []],
            }
        ),
        tmp_path / "pool.parquet",
    )
    out = read_all(DataConfig(input=str(tmp_path / "pool.parquet"), bbox_col="face_bboxes"))
    assert out.column("blur_boxes").to_pylist() == [[[0.1, 0.2, 0.3, 0.4]], None, []]
    assert out.column("source_error").null_count == 3
    assert "face_bboxes" not in out.column_names  # read to blur with, not carried
    (tmp_path / "list.tsv").write_text(
        "url\tcaption\tboxes\n"
        "http://a/1\ta\t[[0, 0, 1, 1], [0.5, 0.5, 0.6, 0.7]]\n"
        "http://a/2\tb\t\n"
        "http://a/3\tc\t[[0, 0, 1]]\n"
        "http://a/4\td\tnot json\n"
    )
    out = read_all(DataConfig(input=str(tmp_path / "list.tsv"), bbox_col="boxes"))
    assert out.column("blur_boxes").to_pylist() == [[[0, 0, 1, 1], [0.5, 0.5, 0.6, 0.7]], None, None, None]
    errors = out.column("source_error").to_pylist()
    assert errors[:2] == [None, None]
    assert "line 4: data.bbox_col 'boxes': not a list of [x_min, y_min, x_max, y_max] boxes" in errors[2]
    assert "line 5: data.bbox_col 'boxes': not a JSON list of boxes" in errors[3]
    with pytest.raises(InputError, match="data.bbox_col 'face_bboxes' is not a column of"):
        read_all(DataConfig(input=str(tmp_path / "list.tsv"), bbox_col="face_bboxes"))
