"""stepkto/jsonl.py: the row schemas, errors that name file, line and field, atomic writes, bytes that are not
UTF-8."""

import pytest

from stepkto import jsonl, sharding


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


SCHEMA = {"id": str, "outcome": bool, "labels": list}


ROW = {"id": str, "v": str}


def test_read_jsonl_names_file_line_and_field(tmp_path):
    good = '{"id": "a", "outcome": true, "labels": []}\n'
    cases = {
        "bad json": (good + '{"id": "b", "outcome": tru\n', ":2: invalid JSON"),
        "missing": (good + '{"id": "b", "labels": []}\n', ":2: missing field 'outcome'"),
        "wrong type": (good + good + '{"id": "c", "outcome": "yes", "labels": []}\n', ":3: field 'outcome' must be bool"),
        "not an object": ("[1, 2]\n", ":1: expected a JSON object"),
        "int is not bool": ('{"id": 1, "outcome": true, "labels": []}\n', ":1: field 'id' must be str"),
    }
    for name, (text, message) in cases.items():
        path = write(tmp_path / f"{name}.jsonl", text)
        with pytest.raises(jsonl.DataError, match=message) as err:
            jsonl.read_jsonl(path, SCHEMA)
        assert str(path) in str(err.value), name


def test_read_jsonl_empty_and_missing_file(tmp_path):
    with pytest.raises(jsonl.DataError, match="empty"):
        jsonl.read_jsonl(write(tmp_path / "e.jsonl", "\n\n"), SCHEMA)
    with pytest.raises(jsonl.DataError, match="not found"):
        jsonl.read_jsonl(tmp_path / "nope.jsonl", SCHEMA)


def test_bool_is_not_accepted_as_int(tmp_path):
    path = write(tmp_path / "x.jsonl", '{"n": true}\n')
    with pytest.raises(jsonl.DataError, match="field 'n' must be int"):
        jsonl.read_jsonl(path, {"n": int})


def test_writers_refuse_rows_that_break_the_schema_and_write_nothing(tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(jsonl.DataError, match=r"out.jsonl: row 2 to write: field 'id' must be str, got int"):
        sharding.append_chunk(out, [{"id": "a", "v": "x"}, {"id": 1, "v": "y"}], ROW)
    with pytest.raises(jsonl.DataError, match=r"out.jsonl: row 1 to write: missing field 'v'"):
        jsonl.write_jsonl_atomic(out, [{"id": "a"}], ROW)
    with pytest.raises(jsonl.DataError, match=r"result.json: field 'pass@1' must be float, got str"):
        jsonl.write_json_atomic(tmp_path / "result.json", {"pass@1": "high"}, {"pass@1": float})
    assert not list(tmp_path.iterdir())


def test_stage_schemas_chain():
    """What label.py writes is what train.py and evaluate.py read; what generate.py writes, label.py reads."""
    assert jsonl.SAMPLE_ROW.items() <= jsonl.LABELLED_ROW.items()
    assert jsonl.STEP_KTO_ROW.items() <= jsonl.LABELLED_ROW.items()
    assert jsonl.KTO_ROW.items() <= jsonl.STEP_KTO_ROW.items()
    assert jsonl.RESULT.items() <= jsonl.RESULTS_TABLE_ROW.items()
    schemas = [jsonl.PROBLEM_ROW, jsonl.SFT_ROW, jsonl.SAMPLE_ROW, jsonl.KTO_ROW, jsonl.LABELLED_ROW]
    assert all(schema["id"] is str for schema in schemas)


def test_read_json_and_complete_rows(tmp_path):
    path = write(tmp_path / "result.json", '{"pass@1": 0.5,\n "n": }')
    with pytest.raises(jsonl.DataError, match=r"result.json:2: invalid JSON"):
        jsonl.read_json(path)
    write(path, '{"pass@1": 0.5}')
    assert jsonl.read_json(path, {"pass@1": float}) == {"pass@1": 0.5}
    with pytest.raises(jsonl.DataError, match="missing field 'n'"):
        jsonl.read_json(path, {"n": int})
    cut = write(tmp_path / "log.jsonl", '{"step": 1}\n{"step": 2}\n{"st')
    assert jsonl.read_complete_rows(cut) == [{"step": 1}, {"step": 2}]
    assert jsonl.read_complete_rows(tmp_path / "absent.jsonl") == []


def test_bytes_that_are_not_utf8_name_file_line_and_column(tmp_path):
    good = b'{"id": "a", "v": "x"}\n'
    path = tmp_path / "samples.jsonl"
    path.write_bytes(good + good + b'{"id": "c", "v": "\xff"}\n' + good)
    message = r"samples.jsonl:3: not UTF-8 \(byte 0xff at column 19\)"
    with pytest.raises(jsonl.DataError, match=message):
        jsonl.read_jsonl(path)
    with pytest.raises(jsonl.DataError, match=message):
        jsonl.read_complete_rows(path)
    cut = tmp_path / "cut.jsonl"  # a kill -9 inside a character of the last line: that line is lost
    cut.write_bytes(good + '{"id": "b", "v": "é'.encode()[:-1])
    assert jsonl.read_complete_rows(cut) == [{"id": "a", "v": "x"}]
    result = tmp_path / "result.json"
    result.write_bytes(b'{"a": 1,\n "b": "\xc3("}\n')
    with pytest.raises(jsonl.DataError, match=r"result.json:2: not UTF-8 \(byte 0xc3 at column 8\)"):
        jsonl.read_json(result)
