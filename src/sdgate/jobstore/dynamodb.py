"""Job records in a DynamoDB table: the store for AWS Lambda, which has no lasting disk.

Configuration is AWS's own: region and credentials from the standard chain, and the table's URL
from ``AWS_ENDPOINT_URL_DYNAMODB`` for DynamoDB-compatible servers (DynamoDB Local, moto), which
boto3 honours. The table is made by the CDK stack (``deploy/aws``) from :data:`TABLE`, or by
:func:`create_table`.

Items (partition key ``id``):

- a job: ``id``, ``kind="job"``, ``created``, ``status``, ``owner`` (when there is one), ``body`` (the
  whole record as JSON, as in SQLite) and ``expires_at`` (the TTL attribute) when
  ``SDGATE_RETENTION`` is set;
- an idempotency key: ``id="idem#<sha256 of owner and key>"``, ``job_id``. It is written in one
  transaction with its job, on the condition that it does not exist yet: of two requests racing
  with one key, exactly one job is stored (the unique index of the SQLite store does the same).

Three sparse global secondary indexes, each sorted by ``created``, serve the ordered reads:
``by-created`` (every job; partition ``kind``), ``by-owner`` and ``by-status``. Index reads are
eventually consistent (a job may show in a list a moment after it was accepted); ``get`` reads
the table itself, strongly consistent. One ``kind`` partition takes every job of ``by-created``:
DynamoDB allows it about 1,000 writes a second, some 300 jobs a second, far more than one model
endpoint draws.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sdgate.jobstore.record import DuplicateJob, JobRecord, record_from_json, record_to_json
from sdgate.schemas import JobStatus

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

TTL_ATTRIBUTE = "expires_at"
# (index name, partition key, sort key); every index is sorted by ``created`` and projects ALL.
INDEXES = (("by-created", "kind"), ("by-owner", "owner"), ("by-status", "status"))
TABLE: dict[str, Any] = {
    "KeySchema": [{"AttributeName": "id", "KeyType": "HASH"}],
    "AttributeDefinitions": [
        {"AttributeName": name, "AttributeType": kind}
        for name, kind in (("id", "S"), ("kind", "S"), ("owner", "S"), ("status", "S"), ("created", "N"))
    ],
    "GlobalSecondaryIndexes": [
        {
            "IndexName": index,
            "KeySchema": [
                {"AttributeName": partition, "KeyType": "HASH"},
                {"AttributeName": "created", "KeyType": "RANGE"},
            ],
            "Projection": {"ProjectionType": "ALL"},
        }
        for index, partition in INDEXES
    ],
    "BillingMode": "PAY_PER_REQUEST",
}
_TERMINAL = tuple(s.value for s in JobStatus if s.is_terminal())


def create_table(client: DynamoDBClient, name: str) -> None:
    """Create the table (and its TTL) as the CDK stack does; for tests and self-managed setups."""
    client.create_table(TableName=name, **TABLE)
    client.get_waiter("table_exists").wait(TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    client.update_time_to_live(
        TableName=name, TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE}
    )


def _idempotency_id(owner: str | None, key: str) -> str:
    # Hashed: a key is up to 255 characters of the client's choosing; the item id stays short and plain.
    return "idem#" + hashlib.sha256(f"{owner or ''}\0{key}".encode()).hexdigest()


def _number(value: float) -> str:
    # repr() round-trips a float exactly; DynamoDB keeps 38 significant digits.
    return repr(float(value))


class DynamoJobStore:
    """Job records in one DynamoDB table (``SDGATE_DYNAMODB_TABLE``).

    ``ttl_s``: when set (``SDGATE_RETENTION``), each item carries ``expires_at = created + ttl_s`` and
    DynamoDB's TTL deletes it some time after that, with no sweep to run.
    """

    def __init__(self, table: str, *, ttl_s: float | None = None, client: DynamoDBClient | None = None):
        self.table = table
        self.ttl_s = ttl_s
        self.client = client or _make_client()

    # -- items ----------------------------------------------------------------------------------

    def _item(self, record: JobRecord) -> dict[str, Any]:
        item: dict[str, Any] = {
            "id": {"S": record.id},
            "kind": {"S": "job"},
            "created": {"N": _number(record.created)},
            "status": {"S": record.status.value},
            "body": {"S": record_to_json(record)},
        }
        if record.owner:  # index keys cannot be empty: jobs without an owner stay out of by-owner
            item["owner"] = {"S": record.owner}
        if self.ttl_s is not None:
            item[TTL_ATTRIBUTE] = {"N": str(int(record.created + self.ttl_s))}
        return item

    @staticmethod
    def _record(item: dict[str, Any]) -> JobRecord:
        return record_from_json(item["body"]["S"])

    # -- writes ---------------------------------------------------------------------------------

    def insert(self, record: JobRecord) -> JobRecord:
        from botocore.exceptions import ClientError

        if record.idempotency_key is not None:
            existing = self.by_idempotency_key(record.owner, record.idempotency_key)
            if existing is not None:
                return existing
        job_put: dict[str, Any] = {
            "TableName": self.table,
            "Item": self._item(record),
            "ConditionExpression": "attribute_not_exists(id)",
        }
        if record.idempotency_key is None:
            try:
                self.client.put_item(**job_put)
            except ClientError as e:
                if _code(e) == "ConditionalCheckFailedException":
                    raise DuplicateJob(f"job {record.id} exists already") from e
                raise
            return record
        key_item: dict[str, Any] = {
            "id": {"S": _idempotency_id(record.owner, record.idempotency_key)},
            "job_id": {"S": record.id},
        }
        if self.ttl_s is not None:
            key_item[TTL_ATTRIBUTE] = {"N": str(int(record.created + self.ttl_s))}
        key_put: dict[str, Any] = {
            "TableName": self.table,
            "Item": key_item,
            "ConditionExpression": "attribute_not_exists(id)",
        }
        try:
            # One transaction: the key and its job appear together, or neither does.
            transaction: list[Any] = [{"Put": key_put}, {"Put": job_put}]
            self.client.transact_write_items(TransactItems=transaction)
        except ClientError as e:
            response: Any = e.response  # CancellationReasons: one per item, in order; "None" where it passed
            reasons = [str(r.get("Code", "None")) for r in response.get("CancellationReasons", [])]
            if _code(e) != "TransactionCanceledException" or "ConditionalCheckFailed" not in reasons:
                raise
            if reasons[0] == "ConditionalCheckFailed":  # the key: another request's job won the race
                existing = self.by_idempotency_key(record.owner, record.idempotency_key)
                if existing is not None:
                    return existing
            raise DuplicateJob(f"job {record.id} exists already") from e
        return record

    def save(self, record: JobRecord) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.put_item(
                TableName=self.table, Item=self._item(record), ConditionExpression="attribute_exists(id)"
            )
        except ClientError as e:
            if _code(e) != "ConditionalCheckFailedException":  # deleted meanwhile: stays deleted, as in SQLite
                raise

    def claim(self, job_id: str, now: float) -> JobRecord | None:
        from botocore.exceptions import ClientError

        record = self.get(job_id)
        if record is None or record.status != JobStatus.queued:
            return None
        record.status, record.started, record.attempts = JobStatus.running, now, record.attempts + 1
        try:
            # Optimistic: written only if the job is still queued, so two workers never both run it.
            self.client.put_item(
                TableName=self.table,
                Item=self._item(record),
                ConditionExpression="#s = :queued",
                ExpressionAttributeNames={"#s": "status"},
                ExpressionAttributeValues={":queued": {"S": JobStatus.queued.value}},
            )
        except ClientError as e:
            if _code(e) == "ConditionalCheckFailedException":
                return None
            raise
        return record

    def delete(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            old = self.client.delete_item(TableName=self.table, Key={"id": {"S": job_id}}, ReturnValues="ALL_OLD")
            item = old.get("Attributes")
            if item and "body" in item:
                record = self._record(item)
                if record.idempotency_key is not None:
                    key_id = _idempotency_id(record.owner, record.idempotency_key)
                    self.client.delete_item(TableName=self.table, Key={"id": {"S": key_id}})

    # -- reads ----------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        item = self.client.get_item(TableName=self.table, Key={"id": {"S": job_id}}, ConsistentRead=True).get("Item")
        return None if item is None or "body" not in item else self._record(item)

    def by_idempotency_key(self, owner: str | None, key: str) -> JobRecord | None:
        item = self.client.get_item(
            TableName=self.table, Key={"id": {"S": _idempotency_id(owner, key)}}, ConsistentRead=True
        ).get("Item")
        return None if item is None else self.get(item["job_id"]["S"])

    def list_jobs(self, *, owner: str | None, limit: int, before: float | None) -> list[JobRecord]:
        if owner == "":
            return []  # an index key cannot be empty, so no job is stored under this owner
        index, partition, value = ("by-created", "kind", "job") if owner is None else ("by-owner", "owner", owner)
        items = self._query(index, partition, value, newest_first=True, before=before, limit=limit)
        return [self._record(i) for i in items]

    def unfinished(self) -> list[JobRecord]:
        queues = [self._query("by-status", "status", s, newest_first=False) for s in ("queued", "running")]
        return [self._record(i) for i in heapq.merge(*queues, key=_created)]

    def older_than(self, cutoff: float, limit: int = 500) -> list[JobRecord]:
        queues = [
            self._query("by-status", "status", s, newest_first=False, before=cutoff, limit=limit) for s in _TERMINAL
        ]
        merged = heapq.merge(*queues, key=_created)
        return [self._record(i) for _, i in zip(range(limit), merged, strict=False)]

    def finished_since(self, cutoff: float) -> list[JobRecord]:
        queues = [self._query("by-status", "status", s, newest_first=False, after=cutoff) for s in _TERMINAL]
        return [self._record(i) for i in heapq.merge(*queues, key=_created)]

    def _query(
        self,
        index: str,
        partition: str,
        value: str,
        *,
        newest_first: bool,
        before: float | None = None,
        after: float | None = None,
        limit: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Items of one index partition in ``created`` order, page after page, at most ``limit``.

        At most one bound: ``created < before`` or ``created >= after`` (a key condition compares its
        sort key once).
        """
        condition = "#p = :p"
        values: dict[str, Any] = {":p": {"S": value}}
        if before is not None:
            condition += " AND created < :before"
            values[":before"] = {"N": _number(before)}
        if after is not None:
            condition += " AND created >= :after"
            values[":after"] = {"N": _number(after)}
        args: dict[str, Any] = {
            "TableName": self.table,
            "IndexName": index,
            "KeyConditionExpression": condition,
            "ExpressionAttributeNames": {"#p": partition},
            "ExpressionAttributeValues": values,
            "ScanIndexForward": not newest_first,
        }
        left = limit
        while left is None or left > 0:
            if left is not None:
                args["Limit"] = left
            page = self.client.query(**args)
            items = page.get("Items", [])
            yield from items
            if left is not None:
                left -= len(items)
            if "LastEvaluatedKey" not in page:
                return
            args["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def close(self) -> None:
        self.client.close()


def _created(item: dict[str, Any]) -> float:
    return float(item["created"]["N"])


def _code(e: Exception) -> str:
    response: Any = getattr(e, "response", {})
    return str(response.get("Error", {}).get("Code", ""))


def _make_client() -> DynamoDBClient:
    import boto3
    from botocore.config import Config

    # A few quick retries: every API call writes or reads a job, and a stalled store stalls it.
    config = Config(connect_timeout=5, read_timeout=10, retries={"total_max_attempts": 3, "mode": "standard"})
    return boto3.client("dynamodb", config=config)
