"""The S3-API server the OBJ tier is tested against answers like S3 (moto's server mode)."""

from __future__ import annotations

import boto3  # comes with moto[server] in the dev extra
import pytest

from tests.s3_fixtures import S3Server

pytestmark = pytest.mark.integration


def test_the_local_s3_server_stores_and_returns_objects(s3_server: S3Server, s3_bucket: str) -> None:
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
    )
    s3.create_bucket(Bucket=s3_bucket)
    payload = bytes(range(256)) * 4096
    s3.put_object(Bucket=s3_bucket, Key="chunk/abc", Body=payload)
    assert s3.get_object(Bucket=s3_bucket, Key="chunk/abc")["Body"].read() == payload
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="chunk/")
    assert [o["Key"] for o in listed["Contents"]] == ["chunk/abc"]
    with pytest.raises(s3.exceptions.NoSuchKey):
        s3.get_object(Bucket=s3_bucket, Key="chunk/missing")
