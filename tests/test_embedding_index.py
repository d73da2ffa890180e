"""The on-disk embedding index (emclip.serving.index): writing in chunks, loading, exact top-k search, bad folders."""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from emclip.evaluation.embeddings import Embeddings
from emclip.serving.index import (
    INDEX_VERSION, EmbeddingIndex, EmbeddingIndexError, IndexWriter, _schema, _vectors_array, top_k)

DIM = 12
SPLITS = ('train', 'val', 'test')


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_chunk(rng, first: int, n_patients: int, attention: str = 'weights') -> tuple[Embeddings, dict]:
    """Random normalised embeddings of patients first.. with 0-5 images each, image rows shuffled (not grouped by
    patient), plus an extra per-image column. ``attention``: 'weights' (random), 'nan' (none) or 'equal'."""
    sizes = rng.integers(1, 6, n_patients)
    sizes[0] = 0  # a patient without images
    owner = np.repeat(np.arange(n_patients), sizes)
    shuffle = rng.permutation(len(owner))
    owner = owner[shuffle]
    slot = np.zeros(len(owner), int)  # image number within its bag, to name the files
    for p in range(n_patients):
        slot[owner == p] = np.arange(int((owner == p).sum()))
    att = {'weights': rng.random(len(owner)), 'nan': np.full(len(owner), np.nan),
           'equal': 1.0 / sizes[owner]}[attention]
    emb = Embeddings(
        patient_ids=[f'P{first + i:04d}' for i in range(n_patients)], split=rng.choice(SPLITS, n_patients),
        diagnosis=rng.choice(['MCD', 'FSGS', ''], n_patients),
        patient=_unit(rng.standard_normal((n_patients, DIM))), report=_unit(rng.standard_normal((n_patients, DIM))),
        image=_unit(rng.standard_normal((len(owner), DIM))), image_patient=owner,
        image_paths=[f'cohort/P{first + p:04d}/img_{s}.tif' for p, s in zip(owner, slot)],
        image_scales=rng.uniform(1, 50, len(owner)), image_attention=att)
    return emb, {'nm_per_pixel': emb.image_scales.astype(np.float64) / 2, 'magnification': slot * 1000}


@pytest.fixture(scope='module')
def chunks():
    rng = np.random.default_rng(0)
    return [make_chunk(rng, 0, 15, 'weights'), make_chunk(rng, 15, 10, 'nan'), make_chunk(rng, 25, 12, 'equal')]


@pytest.fixture(scope='module')
def folder(chunks, tmp_path_factory):
    out = tmp_path_factory.mktemp('index') / 'cohort_index'
    with IndexWriter(out, meta={'model': 'runs/r1', 'cohort': '/data/cohort'}) as writer:
        for emb, columns in chunks:
            writer.add(emb, columns)
    return out


@pytest.fixture(scope='module')
def index(folder):
    return EmbeddingIndex.load(folder)


def expected_images(chunks):
    """Each chunk's images grouped by patient, in bag order: the row order the index promises."""
    rows = []
    for emb, columns in chunks:
        order = np.argsort(emb.image_patient, kind='stable')
        rows.append(dict(patient_id=emb.patient_ids[emb.image_patient[order]], path=emb.image_paths[order],
                         vectors=emb.image[order], scales=emb.image_scales[order],
                         attention=emb.image_attention[order], nm=columns['nm_per_pixel'][order],
                         magnification=columns['magnification'][order]))
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


# ---------------------------------------------------------------------------------------------------- round trip
def test_round_trip_in_chunks(chunks, folder, index):
    embs = [emb for emb, _ in chunks]
    manifest = json.loads((folder / 'index.json').read_text())
    assert manifest['version'] == INDEX_VERSION and manifest['embed_dim'] == DIM
    assert manifest['counts'] == dict(patients=37, images=sum(e.n_images for e in embs), chunks=3)
    assert index.meta == {'model': 'runs/r1', 'cohort': '/data/cohort'}
    assert pq.ParquetFile(folder / 'images.parquet').metadata.num_row_groups == 3  # one row group per add

    p = index.patients
    for column, field in (('patient_id', 'patient_ids'), ('split', 'split'), ('diagnosis', 'diagnosis'),
                          ('diagnosis_source', 'diagnosis_source')):
        assert p[column].tolist() == np.concatenate([getattr(e, field) for e in embs]).tolist()
    np.testing.assert_array_equal(index.patient_vectors, np.concatenate([e.patient for e in embs]))
    assert index.patient_vectors.dtype == np.float32 and not index.patient_vectors.flags.writeable
    assert p['n_images'].tolist() == np.concatenate([np.bincount(e.image_patient, minlength=e.n_patients)
                                                     for e in embs]).tolist()

    want = expected_images(chunks)
    im = index.images
    assert list(im.columns) == ['patient_id', 'path', 'nm_per_pixel', 'magnification', 'effective_nm_per_pixel',
                                'attention']
    assert im['patient_id'].tolist() == want['patient_id'].tolist() and im['path'].tolist() == want['path'].tolist()
    np.testing.assert_array_equal(index.image_vectors, want['vectors'])
    np.testing.assert_array_equal(im['effective_nm_per_pixel'].to_numpy(), want['scales'])
    np.testing.assert_array_equal(im['attention'].to_numpy(), want['attention'])
    np.testing.assert_array_equal(im['nm_per_pixel'].to_numpy(), want['nm'])
    np.testing.assert_array_equal(im['magnification'].to_numpy(), want['magnification'])
    assert index.image_vector(want['path'][7]).tolist() == want['vectors'][7].tolist()
    assert index.patient_vector('P0020').tolist() == embs[1].patient[5].tolist()


def test_patient_summary_columns(chunks, index):
    """nm/px range of each patient's images; most attended image = highest weight, else (none, equal) the first."""
    want = expected_images(chunks)
    p = index.patients.set_index('patient_id')
    for pid in p.index:
        mine = want['patient_id'] == pid
        row = p.loc[pid]
        if not mine.any():
            assert row['n_images'] == 0 and row['most_attended_image'] == ''
            assert np.isnan(row['effective_nm_per_pixel_min']) and np.isnan(row['effective_nm_per_pixel_max'])
            continue
        assert row['effective_nm_per_pixel_min'] == want['scales'][mine].min()
        assert row['effective_nm_per_pixel_max'] == want['scales'][mine].max()
        att = want['attention'][mine]
        first_best = want['path'][mine][0 if np.isnan(att).all() else int(np.argmax(att))]
        assert row['most_attended_image'] == first_best
    # the weighted chunk really picks by weight (not always the first image)
    weighted = p.loc[[f'P{i:04d}' for i in range(1, 15)]]
    firsts = [want['path'][want['patient_id'] == pid][0] for pid in weighted.index]
    assert (weighted['most_attended_image'].to_numpy() != np.asarray(firsts)).any()


# ---------------------------------------------------------------------------------------------------- top-k
def brute_force(queries, vectors, k, allowed=None):
    scores = queries @ vectors.T
    if allowed is not None:
        scores[:, ~allowed] = -np.inf
    rows = np.stack([np.lexsort((np.arange(len(vectors)), -s))[:k] for s in scores])
    rows = rows[:, :min(k, len(vectors) if allowed is None else int(allowed.sum()))]
    return np.take_along_axis(scores, rows, axis=1), rows


@pytest.mark.parametrize('k', [1, 4, 9, 200])
@pytest.mark.parametrize('chunk_rows', [5, 16, 1000])
def test_top_k_equals_a_full_sort_with_ties(k, chunk_rows):
    """Small integer vectors: every dot product is exact and many tie, also across chunk borders and at the k-th
    place; the chunked top-k must equal a full sort with ties to the lower row."""
    rng = np.random.default_rng(k * 100 + chunk_rows)
    vectors = rng.integers(-1, 2, (60, 4)).astype(np.float32)
    vectors[30:40] = vectors[3]  # whole blocks of equal rows
    queries = rng.integers(-1, 2, (6, 4)).astype(np.float32)
    queries[0] = 0  # every row ties
    for allowed in (None, rng.random(60) < 0.4):
        got_scores, got_rows = top_k(queries, vectors, k, allowed, chunk_rows=chunk_rows)
        want_scores, want_rows = brute_force(queries, vectors, k, allowed)
        np.testing.assert_array_equal(got_rows, want_rows)
        np.testing.assert_array_equal(got_scores, want_scores)


def test_top_k_blocks_of_queries(monkeypatch):
    """Queries scored in several blocks (a tiny score budget) give the same answer as all at once."""
    import emclip.serving.index as module
    rng = np.random.default_rng(1)
    vectors, queries = rng.standard_normal((50, 8)).astype(np.float32), rng.standard_normal((7, 8)).astype(np.float32)
    whole = top_k(queries, vectors, 6, chunk_rows=16)
    monkeypatch.setattr(module, '_MAX_SCORES', 32)  # two queries per block of 16 rows
    blocked = top_k(queries, vectors, 6, chunk_rows=16)
    np.testing.assert_array_equal(whole[1], blocked[1])
    np.testing.assert_array_equal(whole[1], brute_force(queries, vectors, 6)[1])


# ---------------------------------------------------------------------------------------------------- search
def test_search_patients_equals_brute_force(index):
    query = np.random.default_rng(2).standard_normal(DIM) * 3.7  # not normalised: search normalises it
    hits = index.search(query, k=5)
    assert list(hits.columns[:4]) == ['rank', 'score', 'patient_id', 'split'] and 'query' not in hits
    scores, rows = brute_force(_unit(query)[None], index.patient_vectors, 5)
    assert hits['patient_id'].tolist() == index.patients['patient_id'].iloc[rows[0]].tolist()
    assert hits['rank'].tolist() == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(hits['score'], scores[0], rtol=1e-6)
    cosine = index.patient_vectors[rows[0]] @ query / np.linalg.norm(query)
    np.testing.assert_allclose(hits['score'], cosine, rtol=1e-5)


def test_search_images_with_split_and_exclusions(index):
    query = np.random.default_rng(3).standard_normal(DIM)
    excluded = ['P0003', 'P0017']
    hits = index.search(query, level='image', k=8, split='test', exclude_patients=excluded)
    owner_split = index.patients.set_index('patient_id').loc[index.images['patient_id'], 'split'].to_numpy()
    allowed = (owner_split == 'test') & ~index.images['patient_id'].isin(excluded).to_numpy()
    scores, rows = brute_force(_unit(query)[None], index.image_vectors, 8, allowed)
    assert hits['path'].tolist() == index.images['path'].iloc[rows[0]].tolist()
    np.testing.assert_allclose(hits['score'], scores[0], rtol=1e-6)
    assert set(hits['split']) == {'test'} and not set(hits['patient_id']) & set(excluded)
    # several splits at once, and patients excluded without a split filter
    both = index.search(query, level='patient', k=50, split=['val', 'test'])
    assert set(both['split']) == {'val', 'test'} and len(both) == index.patients['split'].isin(['val', 'test']).sum()
    assert 'P0003' not in index.search(query, k=37, exclude_patients='P0003')['patient_id'].tolist()


def test_search_many_queries_at_once(index):
    queries = np.random.default_rng(4).standard_normal((4, DIM))
    hits = index.search(queries, level='image', k=3)
    assert list(hits.columns[:3]) == ['query', 'rank', 'score'] and len(hits) == 12
    for q in range(4):
        one = index.search(queries[q], level='image', k=3)
        mine = hits[hits['query'] == q]
        assert mine['path'].tolist() == one['path'].tolist() and mine['rank'].tolist() == [1, 2, 3]
        np.testing.assert_allclose(mine['score'].to_numpy(), one['score'].to_numpy(), rtol=1e-6)


def test_k_beyond_the_candidates_returns_them_all(index):
    hits = index.search(np.ones(DIM), k=1000, split='val')
    assert len(hits) == (index.patients['split'] == 'val').sum()
    assert hits['score'].is_monotonic_decreasing


def test_similar_patients_and_images(index):
    near = index.similar_patients('P0004', k=36)
    assert 'P0004' not in near['patient_id'].tolist() and len(near) == 36
    path = index.images['path'].iloc[10]
    owner = index.images['patient_id'].iloc[10]
    others = index.similar_images(path, k=index.n_images)
    assert owner not in others['patient_id'].tolist()
    scores, rows = brute_force(index.image_vectors[10][None], index.image_vectors, 5,
                               (index.images['patient_id'] != owner).to_numpy())
    assert others['path'].head(5).tolist() == index.images['path'].iloc[rows[0]].tolist()
    anyone = index.similar_images(path, k=index.n_images, other_patients_only=False)
    assert path not in anyone['path'].tolist() and owner in anyone['patient_id'].tolist()
    assert len(anyone) == index.n_images - 1


# ---------------------------------------------------------------------------------------------------- bad input
def test_unknown_ids_and_bad_queries_are_named(index):
    with pytest.raises(EmbeddingIndexError, match=r"unknown patient id 'p0004'; did you mean 'P0004'"):
        index.similar_patients('p0004')
    with pytest.raises(EmbeddingIndexError, match=r"unknown image path 'elsewhere/P0001/img_0.tif'.*"
                                                  r"did you mean 'cohort/P0001/img_0.tif'"):
        index.image_vector('elsewhere/P0001/img_0.tif')
    with pytest.raises(EmbeddingIndexError, match=r"unknown patient id 'nobody'"):
        index.search(np.ones(DIM), exclude_patients=['nobody'])
    with pytest.raises(EmbeddingIndexError, match=r"no patient in split 'tset' \(splits: 'test', 'train', 'val'\)"):
        index.search(np.ones(DIM), split='tset')
    with pytest.raises(EmbeddingIndexError, match=r'shape \(5,\)'):
        index.search(np.ones(5))
    with pytest.raises(EmbeddingIndexError, match='query 1 is zero or not finite'):
        index.search(np.stack([np.ones(DIM), np.zeros(DIM)]))
    with pytest.raises(EmbeddingIndexError, match="level must be 'patient' or 'image'"):
        index.search(np.ones(DIM), level='report')
    with pytest.raises(EmbeddingIndexError, match='k must be a positive'):
        index.search(np.ones(DIM), k=0)


def test_an_empty_index_loads_and_every_search_says_so(tmp_path):
    with IndexWriter(tmp_path / 'empty', meta={}):
        pass
    index = EmbeddingIndex.load(tmp_path / 'empty')
    assert index.n_patients == 0 and index.n_images == 0
    for level in ('patient', 'image'):
        with pytest.raises(EmbeddingIndexError, match='the index is empty'):
            index.search(np.ones(index.embed_dim or 1), level=level)


def test_duplicate_patient_across_chunks_fails_and_leaves_nothing(chunks, tmp_path):
    out = tmp_path / 'dup'
    with pytest.raises(EmbeddingIndexError, match=r"patient id 'P0000' of chunk 2 is already in an earlier chunk"):
        with IndexWriter(out, meta={}) as writer:
            writer.add(*chunks[0])
            writer.add(*chunks[0])
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary left


def test_a_failed_write_leaves_nothing_and_keeps_an_old_index(chunks, tmp_path):
    out = tmp_path / 'idx'
    with pytest.raises(RuntimeError):
        with IndexWriter(out, meta={}) as writer:
            writer.add(*chunks[0])
            raise RuntimeError('embedding failed half-way')
    assert list(tmp_path.iterdir()) == []
    with IndexWriter(out, meta={'n': 1}) as writer:
        writer.add(*chunks[1])
    with pytest.raises(RuntimeError):
        with IndexWriter(out, meta={'n': 2}, force=True) as writer:
            writer.add(*chunks[0])
            raise RuntimeError('killed')
    assert EmbeddingIndex.load(out).meta == {'n': 1} and [p.name for p in tmp_path.iterdir()] == ['idx']


def test_overwriting_is_refused_unless_forced_and_only_for_an_index(chunks, tmp_path):
    out = tmp_path / 'idx'
    with IndexWriter(out, meta={'n': 1}) as writer:
        writer.add(*chunks[1])
    with pytest.raises(EmbeddingIndexError, match='exists and is not empty'):
        IndexWriter(out, meta={})
    with IndexWriter(out, meta={'n': 2}, force=True) as writer:
        writer.add(*chunks[2])
    again = EmbeddingIndex.load(out)
    assert again.meta == {'n': 2} and again.patients['patient_id'].iloc[0] == 'P0025'
    other = tmp_path / 'results'
    other.mkdir()
    (other / 'keep.txt').write_text('precious')
    with pytest.raises(EmbeddingIndexError, match='is not an emclip embedding index.*even with force'):
        IndexWriter(other, meta={}, force=True)
    assert (other / 'keep.txt').read_text() == 'precious'
    with pytest.raises(EmbeddingIndexError, match='exists and is not a folder'):
        IndexWriter(other / 'keep.txt', meta={})
    (tmp_path / 'empty').mkdir()
    with IndexWriter(tmp_path / 'empty', meta={}) as writer:  # an empty folder is fine
        writer.add(*chunks[1])
    with pytest.raises(EmbeddingIndexError, match='not plain JSON'):
        IndexWriter(tmp_path / 'x', meta={'path': Path('/a')})


def test_chunks_must_agree_and_be_normalised(chunks, tmp_path):
    emb, columns = chunks[0]
    with pytest.raises(EmbeddingIndexError, match=r"chunk 2 has image columns \['nm_per_pixel'\], the first chunk"):
        with IndexWriter(tmp_path / 'a', meta={}) as writer:
            writer.add(emb, columns)
            writer.add(chunks[1][0], {'nm_per_pixel': columns['nm_per_pixel'][:chunks[1][0].n_images]})
    with pytest.raises(EmbeddingIndexError, match=r"image column 'nm_per_pixel' of chunk 1 has 3 values for"):
        with IndexWriter(tmp_path / 'b', meta={}) as writer:
            writer.add(emb, {'nm_per_pixel': [1.0, 2.0, 3.0]})
    with pytest.raises(EmbeddingIndexError, match="image column 'path' is a built-in column"):
        with IndexWriter(tmp_path / 'c', meta={}) as writer:
            writer.add(emb, {'path': emb.image_paths})
    with pytest.raises(EmbeddingIndexError, match=r"image column 'nm_per_pixel' of chunk 2 does not fit the first "
                                                  r"chunk's type double"):
        with IndexWriter(tmp_path / 'f', meta={}) as writer:
            writer.add(emb, {'nm_per_pixel': columns['nm_per_pixel']})
            writer.add(chunks[1][0], {'nm_per_pixel': ['20k'] * chunks[1][0].n_images})
    raw = Embeddings.concat([emb])
    raw.patient = raw.patient * 2  # projection or normalisation skipped upstream
    with pytest.raises(EmbeddingIndexError, match=r"patient embedding of 'P0000' has norm 2, expected L2-normalised"):
        with IndexWriter(tmp_path / 'd', meta={}) as writer:
            writer.add(raw)
    with pytest.raises(EmbeddingIndexError, match='outside its with-block'):
        IndexWriter(tmp_path / 'e', meta={}).add(emb)
    assert list(tmp_path.iterdir()) == []


def test_extra_columns_from_pandas_keep_their_missing_values(chunks, tmp_path):
    import pandas as pd
    emb, _ = chunks[1]
    given = pd.Series(np.where(np.arange(emb.n_images) % 3 == 0, np.nan, 2.5), index=np.arange(emb.n_images) + 100)
    scanner = pd.Series(['TEM-A', None] * (emb.n_images // 2) + ['TEM-B'] * (emb.n_images % 2))
    with IndexWriter(tmp_path / 'idx', meta={}) as writer:
        writer.add(emb, {'nm_per_pixel': given, 'scanner': scanner})
    images = EmbeddingIndex.load(tmp_path / 'idx').images
    order = np.argsort(emb.image_patient, kind='stable')
    np.testing.assert_array_equal(images['nm_per_pixel'].to_numpy(), given.to_numpy()[order])
    assert images['scanner'].isna().tolist() == scanner.isna().to_numpy()[order].tolist()
    assert images['scanner'].dropna().tolist() == scanner.to_numpy()[order][scanner.notna().to_numpy()[order]].tolist()


@pytest.fixture
def copy_of(folder, tmp_path):
    import shutil
    out = tmp_path / 'copy'
    shutil.copytree(folder, out)
    return out


def _edit_manifest(folder: Path, **changes):
    manifest = json.loads((folder / 'index.json').read_text())
    manifest.update(changes)
    (folder / 'index.json').write_text(json.dumps(manifest))


def test_missing_and_damaged_files_are_named(copy_of):
    data = bytearray((copy_of / 'images.parquet').read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy_of / 'images.parquet').write_bytes(bytes(data))
    with pytest.raises(EmbeddingIndexError, match=r'images.parquet: SHA-256 differs from index.json'):
        EmbeddingIndex.load(copy_of)
    (copy_of / 'images.parquet').write_bytes(bytes(data[:-10]))
    with pytest.raises(EmbeddingIndexError, match=r'images.parquet: \d+ bytes, index.json says \d+'):
        EmbeddingIndex.load(copy_of, verify=False)
    (copy_of / 'patients.parquet').unlink()
    with pytest.raises(EmbeddingIndexError, match=r'patients.parquet: missing'):
        EmbeddingIndex.load(copy_of)
    (copy_of / 'index.json').unlink()
    with pytest.raises(EmbeddingIndexError, match=r'index.json: missing; .* is not an emclip embedding index'):
        EmbeddingIndex.load(copy_of)
    with pytest.raises(EmbeddingIndexError, match='no such folder'):
        EmbeddingIndex.load(copy_of / 'nothing')


def test_other_version_and_manifest_are_refused(copy_of):
    _edit_manifest(copy_of, version=INDEX_VERSION + 1)
    with pytest.raises(EmbeddingIndexError, match=f'index version {INDEX_VERSION + 1}, this emclip reads version'):
        EmbeddingIndex.load(copy_of)
    _edit_manifest(copy_of, version=INDEX_VERSION, format='something-else')
    with pytest.raises(EmbeddingIndexError, match='not the manifest of an emclip embedding index'):
        EmbeddingIndex.load(copy_of)
    (copy_of / 'index.json').write_text('{"format": ')
    with pytest.raises(EmbeddingIndexError, match='index.json: unreadable'):
        EmbeddingIndex.load(copy_of)


def _rewrite(folder: Path, name: str, table: pa.Table):
    """Replace one file and record its new size (the schema checks, not the checksums, must catch it)."""
    pq.write_table(table, folder / name)
    manifest = json.loads((folder / 'index.json').read_text())
    manifest['files'][name]['bytes'] = (folder / name).stat().st_size
    (folder / 'index.json').write_text(json.dumps(manifest))


def test_wrong_schema_and_width_are_named(copy_of):
    images = pq.read_table(copy_of / 'images.parquet')
    narrow = _vectors_array(np.zeros((len(images), DIM - 2), np.float32) + 0.5, DIM - 2)
    _rewrite(copy_of, 'images.parquet', images.set_column(images.num_columns - 1, 'embedding', narrow))
    with pytest.raises(EmbeddingIndexError, match=rf'images.parquet: embeddings of width {DIM - 2}, index.json '
                                                  rf'says {DIM}'):
        EmbeddingIndex.load(copy_of, verify=False)
    _rewrite(copy_of, 'images.parquet', images.drop_columns(['attention']))
    with pytest.raises(EmbeddingIndexError, match=r"images.parquet: columns \[.*\], expected \[.*'attention'"):
        EmbeddingIndex.load(copy_of, verify=False)
    _rewrite(copy_of, 'images.parquet', images.slice(0, 5))
    with pytest.raises(EmbeddingIndexError, match=r'images.parquet: 5 rows, index.json says'):
        EmbeddingIndex.load(copy_of, verify=False)
    patients = pq.read_table(copy_of / 'patients.parquet')
    _rewrite(copy_of, 'images.parquet', images)
    _rewrite(copy_of, 'patients.parquet', patients.set_column(
        4, 'n_images', pa.array(np.roll(patients['n_images'].to_numpy(), 1).astype(np.int32))))
    with pytest.raises(EmbeddingIndexError, match='images.parquet: its rows are not the images of patients.parquet'):
        EmbeddingIndex.load(copy_of, verify=False)
    _rewrite(copy_of, 'patients.parquet', patients.set_column(
        4, 'n_images', patients['n_images'].cast(pa.int64())))
    with pytest.raises(EmbeddingIndexError, match="patients.parquet: column 'n_images' is int64, expected int32"):
        EmbeddingIndex.load(copy_of, verify=False)


def test_one_row_group_is_read_without_a_copy(chunks, tmp_path):
    """A single chunk's vectors are the decoded Arrow buffer itself (read-only), not a copy of it."""
    emb, columns = chunks[0]
    with IndexWriter(tmp_path / 'one', meta={}) as writer:
        writer.add(emb, columns)
    index = EmbeddingIndex.load(tmp_path / 'one')
    assert not index.image_vectors.flags.owndata and not index.image_vectors.flags.writeable
    np.testing.assert_array_equal(index.patient_vectors, emb.patient)
    assert _schema([], 3).field('embedding').type == pa.list_(pa.float32(), 3)


# ---------------------------------------------------------------------------------------------------- benchmark
def test_search_benchmark_smoke(tmp_path):
    """benchmarks/bench_search.py at toy size: runs end to end and its top-10 equals a full sort."""
    bench_dir = Path(__file__).resolve().parent.parent / 'benchmarks'
    saved = dict(os.environ)
    sys.path.insert(0, str(bench_dir))
    try:
        bench = importlib.import_module('bench_search')
    finally:
        os.environ.clear()
        os.environ.update(saved)
        sys.path.remove(str(bench_dir))
    res = bench.run(**bench.SMOKE, workdir=str(tmp_path))
    assert res['extra']['exact'] is True
    assert res['ratios'][0]['met'] is True and res['table']['rows'][0][0].startswith('write')
    assert list(tmp_path.iterdir()) == []  # the temporary index is gone
