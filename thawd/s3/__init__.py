"""Snapshots in object storage (S3 and S3-compatible stores), as thawd reads and writes them.

Off unless thawd's config has an `[s3]` table whose `allow` lists the buckets and prefixes
thawd may touch: its credentials are its own, not its clients', so without that list any
client could make thawd read whatever those credentials reach (docs/SECURITY.md).

    config.py   the [s3] table, object URIs, the allow-list
    store.py    the one boto3 client: heads, ranged reads, multipart uploads
    objects.py  a snapshot object: its identity (size, ETag) and manifest, read and bounded
    fill.py     parallel ranged reads into a pool buffer, every tensor verified
    cache.py    the local cache directory: whole snapshot files within a byte budget

Everything here blocks (network, disk): thawd calls it on worker threads only.
"""
