"""stepkto/sharding.py: resumable outputs after a kill -9, shards merged to one process's bytes, the seeds of
each chunk."""

import json

from stepkto import jsonl, sharding


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def rows_of(ids):
    return [{"id": i, "v": i * 2} for i in ids]


ROW = {"id": str, "v": str}


# U+2028, U+2029 and U+0085 stay raw in rows written with ensure_ascii=False; str.splitlines splits on them
SEPARATORS = "one\u2028two\u2029three\x85four"


def test_resume_drops_cut_chunk_and_truncated_line(tmp_path):
    out = tmp_path / "out.jsonl"
    chunks = [["a", "b"], ["c", "d"], ["e"]]
    sharding.append_chunk(out, rows_of(["a", "b"]), ROW)
    # a kill -9 in the middle of the second chunk's write: one full row and half a line
    with open(str(out) + ".partial", "a") as f:
        f.write(json.dumps({"id": "c", "v": 4}) + '\n{"id": "d", "v"')
    kept, done = sharding.resume_rows(out, chunks)
    assert done == 1 and [r["id"] for r in kept] == ["a", "b"]
    for chunk in chunks[done:]:
        sharding.append_chunk(out, rows_of(chunk), ROW)
    sharding.finish_output(out)
    assert not (tmp_path / "out.jsonl.partial").exists()
    assert [r["id"] for r in jsonl.read_jsonl(out)] == ["a", "b", "c", "d", "e"]


def test_resume_with_no_partial_and_a_foreign_partial(tmp_path):
    out = tmp_path / "out.jsonl"
    assert sharding.resume_rows(out, [["a"]]) == ([], 0)
    sharding.append_chunk(out, rows_of(["z"]), ROW)  # rows that do not belong to this input are not kept
    assert sharding.resume_rows(out, [["a"]]) == ([], 0)


def test_rows_holding_unicode_line_separators_resume_and_merge_to_one_process_bytes(tmp_path):
    rows = {i: {"id": i, "v": f"{i} {SEPARATORS}"} for i in "abcde"}
    chunk_ids = [["a", "b"], ["c", "d"], ["e"]]

    def write(out, shard):
        return sharding.write_chunks(out, chunk_ids, lambda i: [rows[x] for x in chunk_ids[i]], ROW, shard, "test")

    single = tmp_path / "single.jsonl"
    assert write(single, sharding.Shard())
    assert jsonl.read_jsonl(single, ROW) == list(rows.values())
    killed = tmp_path / "killed.jsonl"  # a kill -9 after chunk 0, in the middle of chunk 1's write
    sharding.append_chunk(killed, [rows["a"], rows["b"]], ROW)
    with open(str(killed) + ".partial", "a", encoding="utf-8") as f:
        f.write(json.dumps(rows["c"], ensure_ascii=False) + "\n" + json.dumps(rows["d"], ensure_ascii=False)[:12])
    assert sharding.resume_rows(killed, chunk_ids) == ([rows["a"], rows["b"]], 1)
    assert write(killed, sharding.Shard()) and killed.read_bytes() == single.read_bytes()
    merged = tmp_path / "merged.jsonl"
    assert not write(merged, sharding.Shard(0, 2)) and write(merged, sharding.Shard(1, 2))
    assert merged.read_bytes() == single.read_bytes()
    assert sharding.shard_rows(merged, chunk_ids, sharding.Shard(0, 2)) == {0: [rows["a"], rows["b"]], 2: [rows["e"]]}


def test_derived_seed_keeps_the_seeds_outputs_were_made_with():
    """generate.py's (seed, chunk index) and label.py mc's (seed, row ids) seeds: changing them changes every
    sample and mc label of a run, so the values are pinned."""
    assert sharding.derived_seed(3, 0) == hash((3, 0)) % 2**31 == 2026115375
    assert sharding.derived_seed(0) == hash((0,)) % 2**31
    assert sharding.derived_seed(1, ["p0#0", "p1#0"]) == 983511498  # zlib.crc32 of '[1, ["p0#0", "p1#0"]]'
    assert 0 <= sharding.derived_seed(-5, 2**40) < 2**31
