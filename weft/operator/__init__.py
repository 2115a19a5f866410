"""weft.operator: the TransferGroup operator (kopf) and the control plane its tests run on."""
