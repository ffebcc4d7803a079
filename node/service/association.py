"""Opening a DICOM association (pynetdicom) and saying in one line why none came: used by the
egress (C-STORE to destinations) and the prior retrieval (C-FIND/C-MOVE)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.association import Association


def associate(ae: AE, host: str, port: int, ae_title: str) -> tuple[Association, str]:
    """``ae.associate``, and where no association came, why in one line ("" when established).

    Judged by the PDUs the peer sent, not pynetdicom's flags: a refused connection also counts as
    "aborted" there, and on a loaded machine an A-ASSOCIATE-RJ is reported as an abort when the peer
    closes its socket right after sending it."""
    from pynetdicom import evt
    from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ

    received: list = []
    assoc = ae.associate(
        host, port, ae_title=ae_title, evt_handlers=[(evt.EVT_PDU_RECV, lambda e: received.append(e.pdu))]
    )
    rejects = [pdu for pdu in received if isinstance(pdu, A_ASSOCIATE_RJ)]
    if assoc.is_established:
        why = ""
    elif rejects:
        why = f"association rejected (A-ASSOCIATE-RJ: {rejects[0].reason_str})"
    elif any(isinstance(pdu, A_ABORT_RQ) for pdu in received):
        why = "association aborted by the peer (A-ABORT)"
    else:
        why = "no association: not reachable (connection refused or timed out)"
    return assoc, why
