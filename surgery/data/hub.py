"""``hf:<dataset>[/<config>]``: a Hugging Face dataset through the ``datasets`` library.

Streamed by default (``DataSource.streaming``): rows arrive over the network in an
order drawn from the seed (``IterableDataset.shuffle``: shard order plus a buffer of
:data:`SHUFFLE_BUFFER` rows), a document's id is its position in that stream, and
reading stops as soon as the token budget is met, so C4 or FineWeb never download
whole. ``streaming: false`` downloads the split first and addresses rows by index.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

from ..errors import DataError
from ..recipe import DataSource
from .sources import SHUFFLE_BUFFER, Document, TextSource, derive_seed


def _candidates(rest: str) -> list[tuple[str, str | None]]:
    """Readings of ``<dataset>[/<config>]`` as (dataset, config): ``a/b/c`` is ``a/b`` config ``c``."""
    parts = rest.split("/")
    if len(parts) == 3:
        return [("/".join(parts[:2]), parts[2])]
    return [(rest, None)] if len(parts) == 1 else [(rest, None), (parts[0], parts[1])]


class HFSource(TextSource):
    """One split of a Hugging Face dataset, one document per row; loaded on first use."""

    def __init__(self, spec: DataSource) -> None:
        super().__init__(spec)
        self.streamed = spec.streaming
        if self.streamed:  # short web documents: bigger calls keep every core busy
            self.read_batch = 256
        self._rows: Any = None

    def identity(self) -> dict[str, Any]:
        return {"shuffle_buffer": SHUFFLE_BUFFER} if self.streamed else {}

    def _load(self) -> Any:
        if self._rows is not None:
            return self._rows
        spec = self.spec
        try:
            import datasets
        except ImportError:
            raise DataError(
                f"data source {spec.source!r} needs the 'datasets' package (pip install datasets) and network "
                "or a local datasets cache; offline, export the text to .jsonl files and give their glob instead"
            ) from None
        errors = []
        for name, config in _candidates(spec.source.removeprefix("hf:")):
            try:
                self._rows = datasets.load_dataset(name, config, split=spec.split, streaming=self.streamed)
                break
            except Exception as err:  # noqa: BLE001 - any failure: try the other reading, then report all
                errors.append(f"{name} (config {config}): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        else:
            raise DataError(
                f"cannot load data source {spec.source!r}: " + "; ".join(errors)
                + ". It needs network or a local datasets cache; offline, use local .jsonl files"
            )
        columns = _columns(self._rows)
        if columns is not None and spec.text_field not in columns:
            raise self._no_field(columns)
        return self._rows

    def _no_field(self, columns: list[str]) -> DataError:
        return DataError(
            f"dataset {self.spec.source!r} has no column {self.spec.text_field!r} (columns: "
            f"{', '.join(columns)}); set text_field on this data source"
        )

    # ---------------------------------------------------------------- downloaded (map-style)

    def doc_ids(self) -> list[str]:
        return [str(i) for i in range(len(self._load()))]

    def read(self, doc_id: str) -> str:
        return _text(self._load()[int(doc_id)][self.spec.text_field])

    # ---------------------------------------------------------------- streamed

    def documents(self, seed: int) -> Iterator[Document]:
        if not self.streamed:
            yield from super().documents(seed)
            return
        rows = self._load()
        if _columns(rows) is not None and hasattr(rows, "select_columns"):
            rows = rows.select_columns([self.spec.text_field])
        rows = rows.shuffle(seed=derive_seed("order", seed, self.split_key) % (1 << 32), buffer_size=SHUFFLE_BUFFER)
        position = 0
        stream = iter(rows)
        while True:
            try:
                row = next(stream)
            except StopIteration:
                return
            except Exception as err:  # network or format failure deep inside datasets
                raise DataError(
                    f"reading data source {self.spec.source!r} failed after {position} documents "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); nothing was cached, "
                    "so run again to start over (or export the text to .jsonl files and give their glob)"
                ) from err
            if self.spec.text_field not in row:
                raise self._no_field(list(row))
            yield str(position), partial(_text, row[self.spec.text_field])
            position += 1


def _columns(rows: Any) -> list[str] | None:
    """Column names where the dataset knows them up front (a stream may not)."""
    names = getattr(rows, "column_names", None)
    return list(names) if names else None


def _text(value: Any) -> str:
    return "" if value is None else str(value)
