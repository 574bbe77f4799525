"""Export a model folder to one GGUF file for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile and a
manifest (sha256, size, type) beside it. Llama-family models (Llama, Mistral, SmolLM2); byte-level BPE or
SentencePiece tokenizers with their special tokens and chat template; tied embeddings and extended
vocabularies included. The file appears only when complete.

  workbench export runs/sw-micro/stages/merge-ties-.../model --gguf sw-ties.gguf --type q8_0
  ollama create sw-ties -f Modelfile && ollama run sw-ties      (from the folder of the .gguf)
  llama-cli -m sw-ties.gguf -cnv
"""
from pathlib import Path

from workbench.export.gguf_export import check_output, export_gguf
from workbench.export.modelfile import ollama_name, run_commands, write_modelfile


def add_arguments(parser):
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face model folder (safetensors)")
    parser.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    parser.add_argument("--type", dest="out_type", choices=["f16", "bf16", "q8_0"], default="f16",
                        help="storage of the weight matrices (norms stay f32); default f16")
    parser.add_argument("--name", help="model name in the file and the Modelfile (default: the folder's name)")
    parser.add_argument("--no-modelfile", action="store_true", help="do not write an Ollama Modelfile beside it")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")


def run(args):
    check_output(args.gguf, force=args.force)
    model_dir = Path(args.model_dir)
    name = args.name or model_dir.resolve().name
    result = export_gguf(model_dir, args.gguf, out_type=args.out_type, force=args.force, name=name)
    print(f"exported {result.tensors} tensors ({result.out_type}) in {result.seconds:.1f} s -> {result.path} "
          f"({result.bytes / 1024**2:.1f} MiB)")
    print(f"  sha256 {result.sha256} (manifest: {result.manifest})")
    for note in result.notes:
        print(f"  note: {note}")
    commands = run_commands(result.path, ollama_name(name))
    if not args.no_modelfile:
        write_modelfile(result.path, chat_template=result.chat_template, stop_tokens=result.stop_tokens,
                        bos_token=result.bos_token, model_name=ollama_name(name))
        print(f"  Ollama: {commands['ollama']}")
    print(f"  llama.cpp: {commands['llama_cpp']}")
    return 0

