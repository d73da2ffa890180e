"""The on-disk embedding index: patient and image embeddings of a cohort in Parquet, and exact top-k search over them.

A folder holds three files (the full schema is in ``docs/embeddings_schema.md``):

* ``patients.parquet`` one row per patient: id, split, diagnosis, number of images, the effective nm/px range the
  model saw, the most attended image and the patient embedding;
* ``images.parquet``   one row per image, grouped by patient in the patients' order: owner id, path, the caller's
  extra columns (e.g. the cohort's ``nm_per_pixel``), effective nm/px, attention weight and the image embedding;
* ``index.json``       format version, embedding width, counts, size and SHA-256 of both files, the caller's meta.

:class:`IndexWriter` appends one chunk of patients at a time (one Parquet row group per chunk), so a cohort of
600,000 images is never held in memory twice; the folder appears atomically when the writer closes.
:class:`EmbeddingIndex` loads a folder into metadata DataFrames plus float32 vector matrices and answers cosine
top-k queries exactly: rows are scored in chunks with a running top-k merge (never a queries x rows matrix), and
ties go to the lower row, so results are deterministic.
"""
from __future__ import annotations

import datetime as _dt
import difflib
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..digests import file_sha256
from ..evaluation.embeddings import Embeddings
from ..paths import atomic_directory

__all__ = ['INDEX_VERSION', 'EmbeddingIndexError', 'IndexWriter', 'EmbeddingIndex', 'top_k']

INDEX_VERSION = 1
INDEX_FORMAT = 'emclip-embedding-index'
PATIENTS_FILE, IMAGES_FILE, MANIFEST_FILE = 'patients.parquet', 'images.parquet', 'index.json'
CHUNK_ROWS = 65_536  # gallery rows scored at once
_MAX_SCORES = 1 << 24  # floats in one block of scores (64 MB): bounds the queries scored together
_NORM_TOLERANCE = 1e-3

_PATIENT_FIELDS = [('patient_id', pa.string()), ('split', pa.string()), ('diagnosis', pa.string()),
                   ('diagnosis_source', pa.string()), ('n_images', pa.int32()),
                   ('effective_nm_per_pixel_min', pa.float32()), ('effective_nm_per_pixel_max', pa.float32()),
                   ('most_attended_image', pa.string())]
_IMAGE_HEAD = [('patient_id', pa.string()), ('path', pa.string())]
_IMAGE_TAIL = [('effective_nm_per_pixel', pa.float32()), ('attention', pa.float32())]
_RESERVED = {name for name, _ in _IMAGE_HEAD + _IMAGE_TAIL} | {'embedding'}


class EmbeddingIndexError(ValueError):
    """An index folder that cannot be written, read or searched as asked; the message names the file or id."""


def _embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def _schema(fields: list, dim: int) -> pa.Schema:
    return pa.schema([pa.field(name, kind) for name, kind in fields] + [pa.field('embedding', _embedding_type(dim))])


def _is_index_folder(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST_FILE).read_text()).get('format') == INDEX_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_unit_rows(vectors: np.ndarray, names: np.ndarray, what: str, where: str) -> None:
    """Every row finite and of unit length: cosine scores are dot products only for normalised rows (a projection
    or normalisation skipped upstream must fail here, not give quietly wrong rankings)."""
    if not len(vectors):
        return
    norms = np.linalg.norm(vectors, axis=1)
    bad = np.flatnonzero(~(np.abs(norms - 1) <= _NORM_TOLERANCE))  # NaN and inf fail too
    if len(bad):
        raise EmbeddingIndexError(f'{where}: {what} embedding of {str(names[bad[0]])!r} has norm '
                                  f'{norms[bad[0]]:.4g}, expected L2-normalised rows ({len(bad)} such rows)')


class IndexWriter:
    """Write an embedding index folder chunk by chunk; the folder appears atomically when the block ends.

    ``out_dir`` must not exist or be empty; ``force=True`` also replaces an existing emclip index there, but never
    any other non-empty folder. ``meta`` (JSON) is stored as is in ``index.json`` (the model and cohort it came from).
    On an exception inside the block nothing is left behind. ::

        with IndexWriter('cohort_index', meta={'model': 'runs/r1'}) as writer:
            for emb, table in chunks:           # an Embeddings of a few thousand patients and their images
                writer.add(emb, {'nm_per_pixel': table['nm_per_pixel'].to_numpy()})

    Each :meth:`add` becomes one Parquet row group, so a reader never decodes more than one chunk at a time beyond
    the vectors it keeps; chunks of about a thousand patients keep the files compact and loading fast.
    """

    def __init__(self, out_dir: str | Path, meta: dict | None = None, force: bool = False):
        self.out_dir = Path(out_dir)
        self.force = force
        self.meta = dict(meta or {})
        try:
            json.dumps(self.meta, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise EmbeddingIndexError(f'{self.out_dir}: the index meta is not plain JSON ({err})') from None
        self._check_target()
        self._session = None
        self._tmp: Path | None = None
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._dim: int | None = None
        self._extra_fields: list[pa.Field] | None = None
        self._seen_ids: set[str] = set()
        self._counts = dict(patients=0, images=0, chunks=0)

    def _check_target(self) -> None:
        path = self.out_dir
        if path.exists() and not path.is_dir():
            raise EmbeddingIndexError(f'{path}: exists and is not a folder')
        if path.is_dir() and any(path.iterdir()):
            if not self.force:
                raise EmbeddingIndexError(f'{path}: exists and is not empty (force=True / --force replaces an '
                                          f'earlier embedding index)')
            if not _is_index_folder(path):
                raise EmbeddingIndexError(f'{path}: is not an emclip embedding index (no {MANIFEST_FILE} of ours); '
                                          f'refusing to replace it even with force')

    @contextmanager
    def _writing(self):
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        with atomic_directory(self.out_dir) as tmp:
            self._tmp = tmp
            try:
                yield self
                self._finish()
            finally:
                self._close_writers()

    def __enter__(self) -> 'IndexWriter':
        if self._session is not None:
            raise EmbeddingIndexError(f'{self.out_dir}: an IndexWriter writes one index; make a new one')
        self._session = self._writing()
        return self._session.__enter__()

    def __exit__(self, exc_type, exc, tb):
        return self._session.__exit__(exc_type, exc, tb)

    def _close_writers(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}

    def _open(self, name: str, schema: pa.Schema) -> pq.ParquetWriter:
        # metadata compresses well; float embeddings hardly do, and uncompressed they decode fastest
        meta_columns = [f.name for f in schema if f.name != 'embedding']
        return pq.ParquetWriter(self._tmp / name, schema, compression={c: 'zstd' for c in meta_columns},
                                use_dictionary=meta_columns, write_statistics=meta_columns)

    def _column(self, name: str, values, chunk: int) -> pa.Array:
        """One extra image column as Arrow (lists, numpy arrays and pandas Series; NaN and None become nulls)."""
        try:
            array = pa.array(values, from_pandas=True)
        except (pa.ArrowException, TypeError, ValueError) as err:
            raise EmbeddingIndexError(f'{self.out_dir}: image column {name!r} of chunk {chunk} cannot be stored '
                                      f'({err})') from None
        return array.cast(pa.string()) if pa.types.is_large_string(array.type) else array

    def _start(self, dim: int, extra: dict) -> None:
        self._dim = dim
        self._extra_fields = []
        for name, values in extra.items():
            if name in _RESERVED:
                raise EmbeddingIndexError(f'{self.out_dir}: image column {name!r} is a built-in column of the index')
            self._extra_fields.append(pa.field(name, self._column(name, values, 1).type))
        self._writers[PATIENTS_FILE] = self._open(PATIENTS_FILE, _schema(_PATIENT_FIELDS, dim))
        image_fields = _IMAGE_HEAD + [(f.name, f.type) for f in self._extra_fields] + _IMAGE_TAIL
        self._writers[IMAGES_FILE] = self._open(IMAGES_FILE, _schema(image_fields, dim))

    def add(self, emb: Embeddings, image_columns: dict | None = None) -> None:
        """Append the patients of ``emb`` and their images as one chunk.

        ``image_columns`` maps extra column names to one value per image of ``emb`` (in its image order), e.g. the
        ``nm_per_pixel`` the cohort table gives; every chunk must pass the same columns. Patient ids must be unique
        across the whole index. Embedding rows must be L2-normalised.
        """
        if self._tmp is None or self._session is None:
            raise EmbeddingIndexError(f'{self.out_dir}: IndexWriter.add outside its with-block')
        extra = dict(image_columns or {})
        chunk = self._counts['chunks'] + 1
        dim = emb.patient.shape[1] if emb.patient.ndim == 2 else None
        if dim is None or (emb.n_images and (emb.image.ndim != 2 or emb.image.shape[1] != dim)):
            raise EmbeddingIndexError(f'{self.out_dir}: chunk {chunk} has patient embeddings of shape '
                                      f'{emb.patient.shape} and image embeddings of shape {emb.image.shape}')
        if self._dim is None:
            self._start(dim, extra)
        elif dim != self._dim:
            raise EmbeddingIndexError(f'{self.out_dir}: chunk {chunk} has {dim}-wide embeddings, the index '
                                      f'{self._dim}-wide ones')
        names = [f.name for f in self._extra_fields]
        if sorted(extra) != sorted(names):
            raise EmbeddingIndexError(f'{self.out_dir}: chunk {chunk} has image columns {sorted(extra)}, the first '
                                      f'chunk had {sorted(names)}')
        for field in self._extra_fields:
            values = self._column(field.name, extra[field.name], chunk)
            if len(values) != emb.n_images:
                raise EmbeddingIndexError(f'{self.out_dir}: image column {field.name!r} of chunk {chunk} has '
                                          f'{len(values)} values for {emb.n_images} images')
            try:
                extra[field.name] = values.cast(field.type)
            except (pa.ArrowException, TypeError, ValueError) as err:
                raise EmbeddingIndexError(f'{self.out_dir}: image column {field.name!r} of chunk {chunk} does not '
                                          f'fit the first chunk\'s type {field.type} ({err})') from None
        ids = emb.patient_ids
        repeated = [p for p in ids.tolist() if p in self._seen_ids]
        if repeated:
            raise EmbeddingIndexError(f'{self.out_dir}: patient id {repeated[0]!r} of chunk {chunk} is already in '
                                      f'an earlier chunk ({len(repeated)} repeated ids)')
        _check_unit_rows(emb.patient, ids, 'patient', f'{self.out_dir}: chunk {chunk}')
        _check_unit_rows(emb.image, emb.image_paths, 'image', f'{self.out_dir}: chunk {chunk}')

        # images grouped by patient in patient order (each patient's images keep their order): a patient's images
        # are then one row range, found from the counts alone
        owner = emb.image_patient
        order = None if np.all(owner[1:] >= owner[:-1]) else np.argsort(owner, kind='stable')
        take = (lambda a: a) if order is None else (lambda a: np.asarray(a)[order])  # noqa: E731
        owner, scales, attention = take(owner), take(emb.image_scales), take(emb.image_attention)
        paths = take(emb.image_paths)
        counts = np.bincount(owner, minlength=emb.n_patients)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        has = counts > 0
        lo = np.full(emb.n_patients, np.nan, np.float32)
        hi = lo.copy()
        if has.any():
            lo[has] = np.minimum.reduceat(scales, starts[has])
            hi[has] = np.maximum.reduceat(scales, starts[has])
        # highest attention first, then bag order: equal weights (mean pooling) or none (NaN) give the first image
        key = np.where(np.isnan(attention), -np.inf, attention)
        best = np.lexsort((np.arange(len(owner)), -key, owner))[starts[has]]
        most_attended = np.full(emb.n_patients, '', dtype=object)
        most_attended[has] = paths[best]

        patients = pa.table({
            'patient_id': pa.array(ids, pa.string()), 'split': pa.array(emb.split, pa.string()),
            'diagnosis': pa.array(emb.diagnosis, pa.string()),
            'diagnosis_source': pa.array(emb.diagnosis_source, pa.string()),
            'n_images': pa.array(counts.astype(np.int32)), 'effective_nm_per_pixel_min': pa.array(lo),
            'effective_nm_per_pixel_max': pa.array(hi), 'most_attended_image': pa.array(most_attended, pa.string()),
            'embedding': _vectors_array(emb.patient, dim)}, schema=self._writers[PATIENTS_FILE].schema)
        columns = {'patient_id': pa.array(ids[owner], pa.string()), 'path': pa.array(paths, pa.string())}
        for field in self._extra_fields:
            columns[field.name] = extra[field.name] if order is None else extra[field.name].take(order)
        columns.update({'effective_nm_per_pixel': pa.array(scales, pa.float32()),
                        'attention': pa.array(attention, pa.float32()),
                        'embedding': _vectors_array(take(emb.image) if emb.n_images else emb.image.reshape(0, dim),
                                                    dim)})
        images = pa.table(columns, schema=self._writers[IMAGES_FILE].schema)
        if emb.n_patients:
            self._writers[PATIENTS_FILE].write_table(patients, row_group_size=max(1, emb.n_patients))
        if emb.n_images:
            self._writers[IMAGES_FILE].write_table(images, row_group_size=max(1, emb.n_images))
        self._seen_ids.update(ids.tolist())
        self._counts['patients'] += emb.n_patients
        self._counts['images'] += emb.n_images
        self._counts['chunks'] = chunk

    def _finish(self) -> None:
        if self._dim is None:  # no chunk at all: an empty index (searching it says so)
            self._start(0, {})
        self._close_writers()
        files = {name: dict(bytes=(self._tmp / name).stat().st_size, sha256=file_sha256(self._tmp / name))
                 for name in (PATIENTS_FILE, IMAGES_FILE)}
        from emclip import __version__
        manifest = dict(format=INDEX_FORMAT, version=INDEX_VERSION, emclip_version=__version__,
                        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds'),
                        embed_dim=self._dim, counts=self._counts,
                        image_columns=[f.name for f in self._extra_fields], files=files, meta=self.meta)
        (self._tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + '\n')
        self._check_target()  # again: a folder may have appeared at out_dir while the chunks were embedded


def _vectors_array(vectors: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)


def _chunk_top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best columns of each row of ``scores`` [Q, C] (k <= C) as (scores, columns) [Q, k], best first; among
    equal scores the lower column wins, also at the k-th place (a partition alone would pick any of them)."""
    q, n = scores.shape
    if k < n:
        kth = np.partition(scores, n - k, axis=1)[:, n - k, None]
        above = scores > kth
        tied = scores == kth
        need = k - above.sum(axis=1)
        crowded = np.flatnonzero(tied.sum(axis=1) > need)
        if len(crowded):  # more columns tie at the k-th score than places left: keep the lowest ones
            tied[crowded] &= np.cumsum(tied[crowded], axis=1) <= need[crowded, None]
        columns = np.nonzero(above | tied)[1].reshape(q, k)
    else:
        columns = np.broadcast_to(np.arange(n), (q, n))
    values = np.take_along_axis(scores, columns, axis=1)
    order = np.lexsort((columns, -values), axis=1)
    return np.take_along_axis(values, order, axis=1), np.take_along_axis(columns, order, axis=1)


def top_k(queries: np.ndarray, vectors: np.ndarray, k: int, allowed: np.ndarray | None = None,
          chunk_rows: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k rows of ``vectors`` [N, E] by dot product with each of ``queries`` [Q, E]: (scores, rows), each
    [Q, min(k, #allowed)], best first, ties to the lower row. ``allowed`` [N] bool restricts the rows.

    Rows are scored ``chunk_rows`` at a time (and queries in blocks that keep a block of scores under 64 MB); each
    chunk's own top k is merged into the running top k, so memory does not grow with N.
    """
    n_rows = len(vectors)
    n_allowed = n_rows if allowed is None else int(np.count_nonzero(allowed))
    k = min(int(k), n_allowed)
    scores_out = np.empty((len(queries), k), np.float32)
    rows_out = np.empty((len(queries), k), np.int64)
    if k == 0:
        return scores_out, rows_out
    query_block = max(1, _MAX_SCORES // min(chunk_rows, n_rows))
    for qa in range(0, len(queries), query_block):
        q = queries[qa:qa + query_block]
        best_scores = np.empty((len(q), 0), np.float32)
        best_rows = np.empty((len(q), 0), np.int64)
        for a in range(0, n_rows, chunk_rows):
            b = min(n_rows, a + chunk_rows)
            keep = None if allowed is None else allowed[a:b]
            if keep is not None and not keep.any():
                continue
            scores = q @ vectors[a:b].T
            if keep is not None:
                scores[:, ~keep] = -np.inf  # never returned: at least k allowed rows score above -inf
            chunk_scores, chunk_best_rows = _chunk_top_k(scores, min(k, b - a))
            best_scores = np.concatenate([best_scores, chunk_scores], axis=1)
            best_rows = np.concatenate([best_rows, chunk_best_rows + a], axis=1)
            order = np.lexsort((best_rows, -best_scores), axis=1)[:, :k]
            best_scores = np.take_along_axis(best_scores, order, axis=1)
            best_rows = np.take_along_axis(best_rows, order, axis=1)
        scores_out[qa:qa + len(q)] = best_scores
        rows_out[qa:qa + len(q)] = best_rows
    return scores_out, rows_out


def _suggestion(name: str, known, what: str) -> str:
    """' (did you mean ...?)' from the closest known names, '' when none is close."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f'; did you mean {", ".join(map(repr, close))}?' if close else f'; no {what} with a similar name'


class EmbeddingIndex:
    """An embedding index folder loaded for search (see the module docstring and ``docs/embeddings_schema.md``).

    ``patients`` / ``images`` are the metadata tables (row i describes row i of ``patient_vectors`` /
    ``image_vectors``, float32, L2-normalised, read-only); ``meta`` is what the writer's caller stored. ::

        index = EmbeddingIndex.load('cohort_index')
        index.search(text_vector, level='image', k=10, split='test')   # rank, score, path, patient_id, ...
        index.similar_patients('P0007', k=5)
    """

    def __init__(self, root: Path, manifest: dict, patients: pd.DataFrame, images: pd.DataFrame,
                 patient_vectors: np.ndarray, image_vectors: np.ndarray):
        self.root = Path(root)
        self.manifest = manifest
        self.meta = manifest.get('meta', {})
        self.embed_dim = int(manifest['embed_dim'])
        self.patients = patients
        self.images = images
        self.patient_vectors = patient_vectors
        self.image_vectors = image_vectors
        counts = patients['n_images'].to_numpy(np.int64)
        self._image_owner = np.repeat(np.arange(len(patients)), counts)
        self._image_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._patient_index = pd.Index(patients['patient_id'].to_numpy(object))
        self._path_index: pd.Index | None = None  # built at the first lookup by path

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> 'EmbeddingIndex':
        """Read and check an index folder. ``verify`` also compares each file's SHA-256 with ``index.json`` (a few
        second for 600,000 images); sizes, schema, counts and the patient/image correspondence are always checked."""
        root = Path(path)
        if not root.is_dir():
            raise EmbeddingIndexError(f'{root}: no such folder (an embedding index is a folder written by '
                                      f'python -m emclip.embed)')
        manifest_path = root / MANIFEST_FILE
        if not manifest_path.is_file():
            raise EmbeddingIndexError(f'{manifest_path}: missing; {root} is not an emclip embedding index')
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise EmbeddingIndexError(f'{manifest_path}: unreadable ({err})') from None
        if not isinstance(manifest, dict) or manifest.get('format') != INDEX_FORMAT:
            raise EmbeddingIndexError(f'{manifest_path}: not the manifest of an emclip embedding index')
        if manifest.get('version') != INDEX_VERSION:
            raise EmbeddingIndexError(f'{manifest_path}: index version {manifest.get("version")!r}, this emclip reads '
                                      f'version {INDEX_VERSION}; embed the cohort again')
        try:
            dim, counts = int(manifest['embed_dim']), manifest['counts']
            n_patients, n_images = int(counts['patients']), int(counts['images'])
            extra = [str(c) for c in manifest['image_columns']]
            files = {name: manifest['files'][name] for name in (PATIENTS_FILE, IMAGES_FILE)}
        except (KeyError, TypeError, ValueError) as err:
            raise EmbeddingIndexError(f'{manifest_path}: lacks or mangles the entry {err}') from None
        for name, record in files.items():
            file = root / name
            if not file.is_file():
                raise EmbeddingIndexError(f'{file}: missing (listed in {MANIFEST_FILE})')
            if file.stat().st_size != record.get('bytes'):
                raise EmbeddingIndexError(f'{file}: {file.stat().st_size} bytes, {MANIFEST_FILE} says '
                                          f'{record.get("bytes")}: the file was changed or damaged')
            if verify and file_sha256(file) != record.get('sha256'):
                raise EmbeddingIndexError(f'{file}: SHA-256 differs from {MANIFEST_FILE}: the file was changed or '
                                          f'damaged')
        patients, patient_vectors = _read_table(root / PATIENTS_FILE, _PATIENT_FIELDS, dim, n_patients)
        image_fields = _IMAGE_HEAD + [(name, None) for name in extra] + _IMAGE_TAIL
        images, image_vectors = _read_table(root / IMAGES_FILE, image_fields, dim, n_images)
        ids = patients['patient_id']
        if ids.duplicated().any():
            raise EmbeddingIndexError(f'{root / PATIENTS_FILE}: patient id {ids[ids.duplicated()].iloc[0]!r} '
                                      f'appears twice')
        counts_per_patient = patients['n_images'].to_numpy(np.int64)
        if (counts_per_patient < 0).any() or counts_per_patient.sum() != n_images or not np.array_equal(
                images['patient_id'].to_numpy(object), np.repeat(ids.to_numpy(object), counts_per_patient)):
            raise EmbeddingIndexError(f'{root / IMAGES_FILE}: its rows are not the images of {PATIENTS_FILE} '
                                      f'patient by patient (n_images and patient_id disagree)')
        return cls(root, manifest, patients, images, patient_vectors, image_vectors)

    @property
    def n_patients(self) -> int:
        return len(self.patients)

    @property
    def n_images(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return (f'EmbeddingIndex({str(self.root)!r}: {self.n_patients:,} patients, {self.n_images:,} images, '
                f'{self.embed_dim}-dim)')

    # ------------------------------------------------------------------------------------------------ lookups
    def _patient_row(self, patient_id) -> int:
        pid = str(patient_id)
        row = self._patient_index.get_indexer([pid])[0]
        if row < 0:
            raise EmbeddingIndexError(f'{self.root}: unknown patient id {pid!r}'
                                      + _suggestion(pid, self._patient_index, 'patient id'))
        return int(row)

    def _image_row(self, path) -> int:
        path = str(path)
        if self._path_index is None:
            self._path_index = pd.Index(self.images['path'].to_numpy(object))
        rows = self._path_index.get_indexer_for([path])
        if rows[0] < 0:
            raise EmbeddingIndexError(f'{self.root}: unknown image path {path!r}' + self._path_suggestion(path))
        if len(rows) > 1:
            owners = ', '.join(repr(p) for p in self.images['patient_id'].iloc[rows[:3]])
            raise EmbeddingIndexError(f'{self.root}: image path {path!r} is in {len(rows)} rows (patients '
                                      f'{owners}); it does not name one image')
        return int(rows[0])

    def _path_suggestion(self, path: str) -> str:
        # the same file name in another folder is the likeliest slip (a relative vs an absolute path); difflib over
        # every path otherwise
        name = Path(path).name
        paths = self.images['path']
        same_name = paths[paths.str.rsplit('/', n=1).str[-1] == name].head(3).tolist() if name else []
        if same_name:
            return f'; did you mean {", ".join(map(repr, same_name))}?'
        return _suggestion(path, paths.tolist(), 'image path')

    def patient_vector(self, patient_id) -> np.ndarray:
        """The [E] embedding of a patient (read-only)."""
        return self.patient_vectors[self._patient_row(patient_id)]

    def image_vector(self, path) -> np.ndarray:
        """The [E] embedding of the image stored under ``path`` exactly as the index lists it (read-only)."""
        return self.image_vectors[self._image_row(path)]

    # ------------------------------------------------------------------------------------------------ search
    def _allowed_patients(self, split, exclude_patients) -> np.ndarray | None:
        """[P] bool of the patients a search may return, None for all."""
        allowed = None
        if split is not None:
            wanted = [split] if isinstance(split, str) else [str(s) for s in split]
            splits = self.patients['split'].to_numpy(object)
            known = sorted(set(splits.tolist()))
            missing = [s for s in wanted if s not in known]
            if missing:
                raise EmbeddingIndexError(f'{self.root}: no patient in split {missing[0]!r} (splits: '
                                          f'{", ".join(repr(s) for s in known)})')
            allowed = np.isin(splits, wanted)
        if isinstance(exclude_patients, str):
            exclude_patients = [exclude_patients]
        rows = [self._patient_row(p) for p in exclude_patients]
        if rows:
            allowed = np.ones(self.n_patients, bool) if allowed is None else allowed
            allowed[rows] = False
        return allowed

    def _queries(self, query) -> np.ndarray:
        q = np.asarray(query, dtype=np.float32)
        if q.ndim not in (1, 2) or q.shape[-1] != self.embed_dim:
            raise EmbeddingIndexError(f'{self.root}: a query is a [{self.embed_dim}] vector or a [Q, {self.embed_dim}] '
                                      f'matrix, got shape {q.shape}')
        q = q.reshape(-1, self.embed_dim)
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        bad = np.flatnonzero(~(np.isfinite(norms[:, 0]) & (norms[:, 0] > 0)))
        if len(bad):
            raise EmbeddingIndexError(f'{self.root}: query {bad[0]} is zero or not finite')
        return q / norms

    def _search(self, query, level: str, k: int, allowed_patients: np.ndarray | None,
                allowed_images: np.ndarray | None = None) -> pd.DataFrame:
        if level not in ('patient', 'image'):
            raise EmbeddingIndexError(f"level must be 'patient' or 'image', got {level!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise EmbeddingIndexError(f'k must be a positive whole number, got {k!r}')
        if self.n_patients == 0 or (level == 'image' and self.n_images == 0):
            raise EmbeddingIndexError(f'{self.root}: the index is empty ({self.n_patients} patients, '
                                      f'{self.n_images} images); nothing to search')
        queries = self._queries(query)
        if level == 'patient':
            vectors, table, allowed = self.patient_vectors, self.patients, allowed_patients
        else:
            vectors, table = self.image_vectors, self.images
            allowed = None if allowed_patients is None else allowed_patients[self._image_owner]
            if allowed_images is not None:
                allowed = allowed_images if allowed is None else allowed & allowed_images
        scores, rows = top_k(queries, vectors, k, allowed)
        hits = table.iloc[rows.reshape(-1)].reset_index(drop=True)
        if level == 'image':  # the owner's split and diagnosis, so that an image hit reads on its own
            owner = self.patients.iloc[self._image_owner[rows.reshape(-1)]]
            hits.insert(1, 'split', owner['split'].to_numpy())
            hits.insert(2, 'diagnosis', owner['diagnosis'].to_numpy())
        hits.insert(0, 'rank', np.tile(np.arange(1, rows.shape[1] + 1), len(rows)))
        hits.insert(1, 'score', scores.reshape(-1).astype(np.float64))
        if np.ndim(query) == 2:
            hits.insert(0, 'query', np.repeat(np.arange(len(rows)), rows.shape[1]))
        return hits

    def search(self, query, level: str = 'patient', k: int = 10, split=None, exclude_patients=()) -> pd.DataFrame:
        """The ``k`` patients (or images) closest to ``query`` by cosine similarity, best first.

        ``query`` is an [E] vector (e.g. an encoded text) or [Q, E] matrix; it is L2-normalised here. ``split``
        (a name or several) keeps only those patients (images: of those patients); ``exclude_patients`` drops
        patients (images: their images). Columns: ``rank`` (1..k; equal scores rank the lower index row first),
        ``score``, then the row's metadata (``patients`` columns; for images the ``images`` columns plus the
        owner's ``split`` and ``diagnosis``). A [Q, E] query adds a leading ``query`` column (its row in ``query``).
        """
        return self._search(query, level, k, self._allowed_patients(split, exclude_patients))

    def similar_patients(self, patient_id, k: int = 10, split=None) -> pd.DataFrame:
        """Patients closest to ``patient_id``'s embedding, itself excluded (as :meth:`search`)."""
        return self.search(self.patient_vector(patient_id), 'patient', k, split, exclude_patients=[patient_id])

    def similar_images(self, path, k: int = 10, other_patients_only: bool = True, split=None) -> pd.DataFrame:
        """Images closest to the image at ``path``: from other patients only (default; a patient's own images are
        usually its nearest), else any image but itself."""
        row = self._image_row(path)
        owner = self.patients['patient_id'].iloc[self._image_owner[row]]
        if other_patients_only:
            return self._search(self.image_vectors[row], 'image', k, self._allowed_patients(split, [owner]))
        not_itself = np.ones(self.n_images, bool)
        not_itself[row] = False
        return self._search(self.image_vectors[row], 'image', k, self._allowed_patients(split, ()), not_itself)


def _read_table(path: Path, fields: list, dim: int, n_rows: int) -> tuple[pd.DataFrame, np.ndarray]:
    """(metadata DataFrame, [n_rows, dim] float32 read-only vectors) of one index file, its schema checked against
    ``fields`` (a None type accepts any: the caller's extra columns)."""
    try:
        parquet = pq.ParquetFile(path)  # not memory-mapped: the mapped file would add its size to the peak RSS
        schema = parquet.schema_arrow
        names = [name for name, _ in fields]
        if schema.names != names + ['embedding']:
            raise EmbeddingIndexError(f'{path}: columns {schema.names}, expected {names + ["embedding"]}')
        for name, kind in fields:
            if kind is not None and schema.field(name).type != kind:
                raise EmbeddingIndexError(f'{path}: column {name!r} is {schema.field(name).type}, expected {kind}')
        vector_type = schema.field('embedding').type
        if vector_type != _embedding_type(dim):
            width = vector_type.list_size if pa.types.is_fixed_size_list(vector_type) else vector_type
            raise EmbeddingIndexError(f'{path}: embeddings of width {width}, {MANIFEST_FILE} says {dim} '
                                      f'(expected fixed_size_list<float32>[{dim}])')
        if parquet.metadata.num_rows != n_rows:
            raise EmbeddingIndexError(f'{path}: {parquet.metadata.num_rows} rows, {MANIFEST_FILE} says {n_rows}')
        metadata = parquet.read(columns=names).to_pandas()
        vectors = _read_vectors(parquet, path, n_rows, dim)
    except (OSError, pa.ArrowException) as err:
        raise EmbeddingIndexError(f'{path}: unreadable Parquet ({err})') from None
    return metadata, vectors


def _read_vectors(parquet: pq.ParquetFile, path: Path, n_rows: int, dim: int) -> np.ndarray:
    """The embedding column as one [n_rows, dim] float32 matrix, decoded one row group at a time into it (so the
    file's vectors are never in memory twice); a file of a single row group is used as decoded, without a copy."""
    out = None
    row = 0
    for group in range(parquet.num_row_groups):
        column = parquet.read_row_group(group, columns=['embedding']).column(0)
        if column.null_count:
            raise EmbeddingIndexError(f'{path}: {column.null_count} missing embeddings in row group {group}')
        for chunk in column.chunks:
            block = chunk.flatten().to_numpy(zero_copy_only=True).reshape(len(chunk), dim)
            if parquet.num_row_groups == 1 and column.num_chunks == 1:
                out = block  # zero-copy: the array keeps the Arrow buffer alive
            else:
                if out is None:
                    out = np.empty((n_rows, dim), np.float32)
                out[row:row + len(chunk)] = block
            row += len(chunk)
    if out is None:
        out = np.empty((n_rows, dim), np.float32)
    out.setflags(write=False)
    return out
