"""Export steps: Video-LLM -> GGUF + mmproj (llama.cpp), Lite ranker -> ONNX. Installed as `flexselect_export`."""
