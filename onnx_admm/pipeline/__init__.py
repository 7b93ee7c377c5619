"""The steps ``onnx_admm.api.compress`` runs, one module each."""
