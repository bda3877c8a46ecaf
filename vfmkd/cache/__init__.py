"""The HDF5 teacher-output cache: its format (fingerprints, file names, the rebuild command), the writer
and reader, the storage codec, the writer's lock and the per-rank shards. It knows no teacher and no
dataset: the filling loop is handed both (:mod:`vfmkd.cache.fill`)."""
from vfmkd.cache.format import cache_file, rebuild_command
from vfmkd.cache.reader import FeatureCacheReader
from vfmkd.cache.writer import FeatureCacheWriter

__all__ = ["FeatureCacheReader", "FeatureCacheWriter", "cache_file", "rebuild_command"]
