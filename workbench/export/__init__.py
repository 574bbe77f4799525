"""Export a model folder for the runtimes a community runs locally: GGUF for llama.cpp, Ollama and LM Studio
(`gguf_export`), and the Ollama Modelfile that goes beside it (`modelfile`)."""
