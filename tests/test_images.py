"""Images in chat: the tiny LLaVA through the real Transformers loader, the magics in a real IPython
shell, records and replay by sha256, and the one-line refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import nbllm
from nbllm.chat import Conversation
from nbllm.errors import ImageError
from nbllm.images import as_image, parts, recall


@pytest.fixture(scope="session")
def tiny_vision() -> Path:
    from nbllm.testing import tiny_vision_model

    return tiny_vision_model()


@pytest.fixture
def vision(engine: Any, tiny_vision: Path) -> Any:
    engine.load(str(tiny_vision))
    return engine


def _picture(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _library_reply(folder: Path, content: list[dict[str, Any]], images: list[Any], max_new_tokens: int) -> str:
    """What transformers itself answers: its processor's chat template, its processor, greedy generate."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    inputs = processor(text=text, images=images, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return str(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))


# -- the image values ------------------------------------------------------------------------------------
def test_an_image_is_named_by_the_sha256_of_its_pixels_however_it_is_given(tmp_path: Path) -> None:
    array = _picture(1)
    Image.fromarray(array).save(tmp_path / "a.png")
    from_array, from_file, from_pil = as_image(array), as_image(tmp_path / "a.png"), as_image(Image.fromarray(array))
    assert from_array.sha256 == from_file.sha256 == from_pil.sha256
    assert as_image(_picture(2)).sha256 != from_array.sha256
    assert (from_array.width, from_array.height) == (32, 32)
    assert np.array_equal(np.asarray(recall(from_array.sha256).pil()), array)  # PNG keeps the pixels
    assert parts(["What is ", array, "?"]) == [
        {"type": "text", "text": "What is "}, {"type": "image", "sha256": from_array.sha256},
        {"type": "text", "text": "?"}]


def test_bad_images_are_one_line_each(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageError) as corrupt:
        as_image(tmp_path / "broken.png")
    assert "broken.png" in str(corrupt.value) and "\n" not in str(corrupt.value)
    with pytest.raises(ImageError, match="there is no file"):
        as_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match=r"shape \(4,\), not an image"):
        as_image(np.zeros(4, dtype=np.uint8))
    with pytest.raises(ImageError, match="not held in memory"):
        recall("0" * 64)


def test_the_tiny_vision_model_is_deterministic(tmp_path: Path, tiny_vision: Path) -> None:
    from nbllm.testing import tiny_vision_model

    again = tiny_vision_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
        assert (again / name).read_bytes() == (tiny_vision / name).read_bytes(), name
    assert json.loads((again / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]


# -- the Transformers loader -----------------------------------------------------------------------------
def test_a_chat_with_an_image_gives_what_transformers_gives(vision: Any, tiny_vision: Path) -> None:
    assert vision.loader.takes_images and vision.loader.processor is not None
    picture = _picture(3)
    chat = Conversation("look", engine=vision)
    reply = chat.send(["What is in ", picture, "?"], temperature=0, max_new_tokens=8)
    content = [{"type": "text", "text": "What is in "}, {"type": "image"}, {"type": "text", "text": "?"}]
    assert reply.text == _library_reply(tiny_vision, content, [Image.fromarray(picture)], 8)
    # the image's 16 tokens are in the prompt the engine counted
    assert reply.prompt_tokens == len(vision.loader.tokenize(reply.record.prompt, add_special=False)) + 15
    # the pixels decide the reply: another picture, another answer (same text)
    other = Conversation("other", engine=vision).send(["What is in ", _picture(4), "?"], temperature=0,
                                                      max_new_tokens=8)
    assert other.text != reply.text
    # several prompts at once: each with its own pixels (rows with images are not batched together)
    many = nbllm.generate_many([[{"role": "user", "content": ["What is in ", p, "?"]}] for p in (picture, _picture(4))],
                               temperature=0, max_new_tokens=8, engine=vision)
    assert [r.text for r in many] == [reply.text, other.text]
    # records carry the hash, never the pixels
    sha = as_image(picture).sha256
    assert reply.record.messages[0]["content"][1] == {"type": "image", "sha256": sha}
    saved = json.dumps(reply.record.to_dict())
    assert sha in saved and "base64" not in saved and len(saved) < 20_000
    # a second turn keeps the image in the history; text-only turns work as before
    second = chat.send("And now?", temperature=0, max_new_tokens=4)
    _ = second.text
    assert second.record.messages[0]["content"][1]["sha256"] == sha and len(chat) == 2


def test_a_saved_conversation_keeps_the_hashes_and_loads_back(vision: Any, tmp_path: Path) -> None:
    chat = Conversation("keep", engine=vision)
    _ = chat.send([_picture(5), "Describe it."], temperature=0, max_new_tokens=4).text
    path = chat.save(tmp_path / "keep.json")
    data = json.loads(path.read_text())
    assert data["messages"][0]["content"][0]["type"] == "image" and data["turns"][0]["parts"][0]["sha256"]
    back = Conversation.load(path)
    assert back.messages() == chat.messages() and "[image " in str(back)


def test_a_text_only_model_refuses_an_image_in_one_line(engine: Any, tiny_model: Path) -> None:
    engine.load(str(tiny_model))
    chat = Conversation("blind", engine=engine)
    with pytest.raises(ImageError) as refused:
        chat.send(["What is this?", _picture(6)], max_new_tokens=2)
    assert "takes no images" in str(refused.value) and "\n" not in str(refused.value)
    assert len(chat) == 0 and not chat.generating
    assert chat.send("Still there?", max_new_tokens=2).text is not None  # the model and the chat still work


# -- the magics ------------------------------------------------------------------------------------------
def test_the_chat_magic_takes_images_from_the_namespace(shell: Any, vision: Any, tiny_vision: Path,
                                                        tmp_path: Path) -> None:
    from IPython.core.error import UsageError

    picture = _picture(7)
    Image.fromarray(picture).save(tmp_path / "p.png")
    shell.user_ns.update(img=Image.fromarray(picture), path=tmp_path / "p.png", word="colour")
    shell.run_cell_magic("llm_chat", "eye --temperature 0 --max-new-tokens 6 -o r", "{img} Which {word}?")
    r = shell.user_ns["r"]
    assert r.record.messages[0]["content"] == [{"type": "image", "sha256": as_image(picture).sha256},
                                               {"type": "text", "text": " Which colour?"}]
    library = Conversation("lib", engine=vision).send([picture, " Which colour?"], temperature=0, max_new_tokens=6)
    assert r.text == library.text
    # a path is the same picture
    shell.run_cell_magic("llm_chat", "eye2 --temperature 0 --max-new-tokens 6 -o p", "{path} Which {word}?")
    assert shell.user_ns["p"].text == r.text
    # {{img}} stays text
    shell.run_cell_magic("llm_chat", "eye3 --temperature 0 --max-new-tokens 2 -o t", "{{img}}")
    assert shell.user_ns["t"].record.messages[0]["content"] == "{img}"
    shell.user_ns["bad"] = tmp_path / "nothing.png"
    with pytest.raises(UsageError, match="there is no file"):
        shell.run_cell_magic("llm_chat", "eye4", "{bad} What?")


# -- replay ----------------------------------------------------------------------------------------------
@pytest.fixture
def image_log(vision: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    from nbllm.runlog import flush

    flush()
    log = tmp_path / "runs.sqlite"
    monkeypatch.setenv("NBLLM_RUN_LOG", str(log))
    text = Conversation("rec", engine=vision).send([_picture(8), "What?"], temperature=0, max_new_tokens=6).text
    flush()
    monkeypatch.setenv("NBLLM_RUN_LOG", "off")
    yield log, text
    nbllm.replay(None)


def test_replay_matches_the_images_by_hash(image_log: tuple[Path, str], tiny_vision: Path) -> None:
    log, text = image_log
    nbllm.replay(log)
    nbllm.load(str(tiny_vision))
    again = Conversation("rec2").send([_picture(8), "What?"], temperature=0, max_new_tokens=6)
    assert again.text == text and again.replayed
    with pytest.raises(nbllm.NbllmError, match="no recorded run") as miss:
        _ = Conversation("rec3").send([_picture(9), "What?"], temperature=0, max_new_tokens=6).text
    assert "message" in str(miss.value)


# -- serving, and the remote loader ----------------------------------------------------------------------
def test_llm_serve_takes_image_url_parts_from_the_openai_client(vision: Any) -> None:
    import base64
    import io

    import openai

    from nbllm.serve import stop

    picture = _picture(10)
    png = io.BytesIO()
    Image.fromarray(picture).save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    server = nbllm.serve(port=0)
    try:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        answer = client.chat.completions.create(
            model=nbllm.status().model, temperature=0, max_tokens=6,
            messages=[{"role": "user", "content": [{"type": "text", "text": "What is "},
                                                   {"type": "image_url", "image_url": {"url": url}}]}])
        local = nbllm.generate([{"role": "user", "content": ["What is ", picture]}], temperature=0, max_new_tokens=6)
        assert answer.choices[0].message.content == local.text
        # nbllm's remote loader (in an engine of its own) sends the image to the server as an image_url part
        from nbllm.engine import Engine

        remote = Engine()
        remote.load(server.url)
        try:
            assert remote.generate([{"role": "user", "content": ["What is ", picture]}], temperature=0,
                                   max_new_tokens=6).text == local.text
        finally:
            remote.unload()
        with pytest.raises(openai.BadRequestError, match="not an image file"):
            client.chat.completions.create(model=nbllm.status().model, max_tokens=2, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    finally:
        stop()


def test_the_remote_loader_sends_images_as_image_url_parts() -> None:
    from nbllm.loaders.openai import wire_messages

    image = as_image(_picture(11))
    messages = [{"role": "system", "content": "Short."},
                {"role": "user", "content": [{"type": "text", "text": "See "}, image.part()]}]
    assert wire_messages(messages, [image]) == [
        {"role": "system", "content": "Short."},
        {"role": "user", "content": [{"type": "text", "text": "See "},
                                     {"type": "image_url", "image_url": {"url": image.data_url()}}]}]
    ollama = wire_messages(messages, [image], native=True)[1]
    assert ollama["content"] == "See " and ollama["images"] == [image.data_url().partition(",")[2]]



def test_the_remote_body_carries_image_parts_and_tools_together() -> None:
    import threading

    from nbllm.loaders.base import Request
    from nbllm.loaders.openai import SERVERS, request_body
    from nbllm.options import GenerationOptions

    image = as_image(_picture(12))
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Lisbon"}}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "Rain here? "}, image.part()]},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": '{"sky": "grey"}', "tool_call_id": "c1", "name": "weather"}]
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    request = Request(prompt="", prompt_ids=None, options=GenerationOptions(), seed=1, cancel=threading.Event(),
                      messages=messages, images=[image], tools=[tool], tool_choice="weather")
    body = request_body(SERVERS["llama.cpp"], "m", request)[1]
    assert body["messages"][0]["content"][1] == {"type": "image_url", "image_url": {"url": image.data_url()}}
    assert body["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Lisbon"}'
    assert body["messages"][2] == messages[2]
    assert body["tools"] == [tool] and body["tool_choice"] == {"type": "function", "function": {"name": "weather"}}


def test_a_turn_carries_images_and_tool_steps_and_saves_both() -> None:
    from nbllm.chat import Reply, ToolStep, Turn
    from nbllm.tools import ToolCall

    image = as_image(_picture(13))
    call = ToolCall("weather", {"city": "Lisbon"}, id="c1", result='{"sky": "grey"}')
    turn = Turn(user="Rain here? ", parts=parts(["Rain here? ", image]), images=[image],
                steps=[ToolStep("", [call])], reply=Reply("Yes.", False, "stop", []))
    roles = [m["role"] for m in turn.messages()]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert turn.messages()[0]["content"][1] == image.part() and turn.tool_calls == [call]
    back = Turn.from_dict(json.loads(json.dumps(turn.to_dict())), "turn 1")
    assert back.parts == turn.parts and back.messages() == turn.messages() and back.images == []

# -- llama.cpp: a GGUF model and its projector -----------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_gguf_vision() -> Path:
    from nbllm.testing import tiny_gguf_vision_model

    return tiny_gguf_vision_model()


def test_llama_cpp_with_its_projector_gives_what_llama_cpp_pythons_mtmd_handler_gives(
        engine: Any, tiny_gguf_vision: Path) -> None:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from nbllm.testing import TINY_VISION_CHAT_TEMPLATE

    engine.load(str(tiny_gguf_vision))
    assert engine.loader.takes_images and engine.status().model == "tiny.gguf"
    assert nbllm.get_engine().model_identity()["projector"].endswith("mmproj-tiny-f32.gguf")
    picture = _picture(12)
    chat = Conversation("gguf", engine=engine)
    mine = chat.send(["What is ", picture, "?"], temperature=0, max_new_tokens=8)
    _ = mine.text
    assert "<__media__>" in mine.record.prompt  # libmtmd's marker where the image stands; 16 positions for it
    text_tokens = engine.loader.tokenize(mine.record.prompt.replace("<__media__>", ""), add_special=False)
    assert mine.prompt_tokens == len(text_tokens) + 16
    again = Conversation("gguf2", engine=engine).send(["What is ", picture, "?"], temperature=0, max_new_tokens=8).text
    other = Conversation("gguf3", engine=engine).send(["What is ", _picture(13), "?"], temperature=0, max_new_tokens=8).text
    assert again == mine.text != other
    assert chat.send("And?", temperature=0, max_new_tokens=3).text is not None  # the history with its image
    engine.unload()

    class Handler(MTMDChatHandler):  # the tiny template, as the handler renders it (it renders eos_token as "")
        def _get_chat_template(self, llama: Any) -> str:
            return TINY_VISION_CHAT_TEMPLATE.replace("{{- bos_token }}", "", 1).replace("eos_token", "'</s>'")

    llm = Llama(str(tiny_gguf_vision / "tiny.gguf"), n_ctx=2048, verbose=False,
                chat_handler=Handler(clip_model_path=str(tiny_gguf_vision / "mmproj-tiny-f32.gguf"), verbose=False))
    try:
        theirs = llm.create_chat_completion(messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is "}, {"type": "image_url", "image_url": {"url": as_image(picture).data_url()}},
            {"type": "text", "text": "?"}]}], temperature=0, max_tokens=8, repeat_penalty=1.0)
    finally:
        llm.close()
    # the same tokens: llama-cpp-python drops an incomplete UTF-8 piece where nbllm shows U+FFFD
    assert mine.text.replace("\ufffd", "") == theirs["choices"][0]["message"]["content"]


def test_the_models_folder_lists_a_projector_beside_its_model(tmp_path: Path, tiny_gguf_vision: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from nbllm import models

    home = tmp_path / "models"
    shutil.copytree(tiny_gguf_vision, home / "tiny-vision")
    monkeypatch.setenv(models.ENV_VAR, str(home))
    models.set_models_dir(None)
    try:
        (entry,) = models.ModelsFolder().list()
        assert (entry.name, entry.projector, entry.complete) == ("tiny-vision", "mmproj-tiny-f32.gguf", True)
        assert entry.format_label == "GGUF F32 + mmproj"
        source = models.source_from_path(home / "tiny-vision")  # one model: the projector is not a second one
        assert source.name == "tiny.gguf" and source.projector == (home / "tiny-vision" / "mmproj-tiny-f32.gguf").resolve()
        (home / "tiny-vision" / "mmproj-tiny-f32.gguf").unlink()
        assert models.source_from_path(home / "tiny-vision").projector is None
    finally:
        models.set_models_dir(None)


def test_a_projector_that_does_not_fit_the_model_is_one_line(engine: Any, tiny_gguf_vision: Path,
                                                             tmp_path: Path) -> None:
    import shutil

    from nbllm.errors import LoadError
    from nbllm.testing import tiny_gguf_model

    folder = tmp_path / "wide"
    folder.mkdir()
    tiny_gguf_model(folder / "wide.gguf", hidden_size=128, num_heads=2)  # 128 wide; the projector gives 64
    shutil.copy(tiny_gguf_vision / "mmproj-tiny-f32.gguf", folder)
    with pytest.raises(LoadError) as refused:
        engine.load(str(folder))
    message = str(refused.value)
    assert "could not load the projector mmproj-tiny-f32.gguf" in message and "\n" not in message


# -- the chat panel --------------------------------------------------------------------------------------
def test_the_chat_panel_sends_an_uploaded_image(vision: Any) -> None:
    import io

    from nbllm.chat import forget
    from nbllm.options import GenerationOptions
    from nbllm.widgets import ChatPanel

    def upload(name: str, data: bytes) -> dict[str, Any]:
        import datetime

        return {"name": name, "type": "image/png", "size": len(data), "content": memoryview(data),
                "last_modified": datetime.datetime.now(datetime.timezone.utc)}  # as the front end's upload gives it

    picture = _picture(14)
    png = io.BytesIO()
    Image.fromarray(picture).save(png, format="PNG")
    vision.defaults = GenerationOptions(temperature=0, max_new_tokens=6)
    forget("panel-images")
    panel = ChatPanel("panel-images")
    try:
        panel.upload.value = (upload("broken.png", b"not a picture"),)
        panel.input.value = "What is it?"
        panel.send_button.click()
        assert "broken.png is not an image file" in panel.messages.error_text and len(panel.chat) == 0
        assert panel.input.value == "What is it?"  # nothing was sent: the message stays

        panel.upload.value = (upload("p.png", png.getvalue()),)
        panel.send_button.click()
        assert panel.wait(120) and panel.messages.error_text == ""
        turn = panel.chat.turns[-1]
        assert turn.parts == [{"type": "image", "sha256": as_image(picture).sha256},
                              {"type": "text", "text": "What is it?"}]
        assert panel.upload.value == () and panel.input.value == ""
        expected = Conversation("panel-lib", engine=vision).send([picture, "What is it?"]).text
        assert turn.reply is not None and turn.reply.content == expected
        user_view = panel.view.children[0]
        assert user_view.images and "data:image/png;base64," in user_view.value
    finally:
        panel.close()
        forget("panel-images")
