"""The S3-API server the OBJ tier is tested against answers like S3 (moto's server mode)."""

from __future__ import annotations

import pytest

from tests.s3_fixtures import S3Server, s3_client

pytestmark = pytest.mark.integration


def test_the_local_s3_server_stores_and_returns_objects(s3_server: S3Server, s3_bucket: str) -> None:
    s3 = s3_client(s3_server)
    payload = bytes(range(256)) * 4096
    s3.put_object(Bucket=s3_bucket, Key="chunk/abc", Body=payload)
    assert s3.get_object(Bucket=s3_bucket, Key="chunk/abc")["Body"].read() == payload
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="chunk/")
    assert [o["Key"] for o in listed["Contents"]] == ["chunk/abc"]
    with pytest.raises(s3.exceptions.NoSuchKey):
        s3.get_object(Bucket=s3_bucket, Key="chunk/missing")
