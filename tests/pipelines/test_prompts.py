"""One prompt format for SFT and evaluation: chat turns when the tokenizer has a template, plain text otherwise."""
import pytest
from transformers import AutoTokenizer

from workbench.config.loader import load_language
from workbench.errors import ConfigError
from workbench.pipelines.prompts import ENGLISH_TEMPLATE, PromptFormat, answer_text, messages, prompt_text


def test_chat_rendering_and_answer_continue_each_other(tiny_tokenizer):
    fmt = PromptFormat.from_config(load_language("sw").language.prompt)
    text = prompt_text(tiny_tokenizer, fmt, "Juma ana maembe 3. Anapata 2 zaidi. Ana maembe mangapi?")
    assert text.endswith("<|im_start|>assistant\n")
    assert "Swali: Juma ana maembe 3." in text and "Jibu la Hatua kwa Hatua:" in text
    assert answer_text(tiny_tokenizer, "3 + 2 = 5. Jibu ni 5.") == "3 + 2 = 5. Jibu ni 5.<|im_end|>\n"
    one_shot = messages(fmt, "q?", n_shot=1)
    assert [t["role"] for t in one_shot] == ["user", "assistant", "user"]
    with pytest.raises(ConfigError, match="n_shot 2 asks for more exemplars than the prompt has \\(1\\)"):
        messages(fmt, "q?", n_shot=2)


def test_plain_rendering_without_chat_template(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = None
    fmt = PromptFormat(template=ENGLISH_TEMPLATE, exemplars=(("1+1?", "1 + 1 = 2. The answer is 2."),))
    text = prompt_text(tok, fmt, "2+2?", n_shot=1)
    assert text == ("Question: 1+1?\nStep-by-Step Answer: 1 + 1 = 2. The answer is 2.\n\n"
                    "Question: 2+2?\nStep-by-Step Answer: ")
    assert answer_text(tok, "4") == "4<|im_end|>"
