"""Why the cloud refuses a request, in the domain's terms.

The service, its devices and the request checks raise these; only the transport
(`fairedge.server.cloud.servicer`) knows which gRPC status each becomes. The message
names the field, the value received and what is allowed, so a device developer can
fix the call from the error alone.
"""

from __future__ import annotations


class CloudError(Exception):
    """A request the cloud refuses; `str(err)` is the message for the caller."""


class InvalidRequest(CloudError):
    """A malformed field: a device id, an input's name, dtype, shape or values, a mixed Upload stream."""


class BatchTooLarge(CloudError):
    """More samples in one SampleBatch than `cloud.max_batch_samples`: split it."""


class UnknownDevice(CloudError):
    """A device id that never registered: call Register first."""


class WrongModel(CloudError):
    """A device that runs a model (id or version) this cloud does not serve."""


class Overloaded(CloudError):
    """A valid request the cloud cannot take now (too many samples waiting): back off and send it again."""


class ShuttingDown(CloudError):
    """The service is stopping: reconnect (to it when it is back, or to another)."""


class Unauthenticated(CloudError):
    """No valid credential: missing, malformed, unknown, revoked or rotated."""


class NotYourDevice(CloudError):
    """A valid credential used for another device's id: each device acts only for itself."""


class StaleEpoch(CloudError):
    """A batch of an epoch the device no longer uses (another Register started a new one): register again."""
