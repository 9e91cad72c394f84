//! Typed requests to engine requests, against the model served: its name, its chat template,
//! what it takes (text, and images for a vision-language model), and its sampling defaults.

use pio_runtime::chat_template::RenderOptions;
use pio_runtime::engine::{ModelInfo, Prompt, Request};
use pio_runtime::generate::GenerateOptions;
use serde_json::{json, Map, Value as Json};

use crate::error::{ApiError, PromptFields};
use crate::parse::Endpoint;
use crate::protocol::request::{
    ChatCompletionRequest, ChatMessage, CompletionPrompt, CompletionRequest, ContentPart, GenerationParams,
    MessageContent,
};

/// A request ready for the engine, with what the response needs to know about it.
#[derive(Debug)]
pub(crate) struct Job {
    pub endpoint: Endpoint,
    pub request: Request,
    pub params: GenerationParams,
    pub fields: PromptFields,
}

pub(crate) fn chat_job(chat: ChatCompletionRequest, info: &ModelInfo) -> Result<Job, ApiError> {
    let options = options(&chat.params, info)?;
    if !info.has_chat_template {
        return Err(ApiError::field(
            "messages",
            "this model has no chat template (tokenizer_config.json without chat_template): use /v1/completions",
        ));
    }
    let messages = chat
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| template_message(i, m, info.takes_images))
        .collect::<Result<_, _>>()?;
    let render = RenderOptions {
        add_generation_prompt: chat.template.add_generation_prompt,
        enable_thinking: chat.template.enable_thinking,
        extra: chat.template.extra,
        ..RenderOptions::default()
    };
    let fields = PromptFields { prompt: "messages", max_tokens: chat.params.max_tokens_field };
    Ok(Job {
        endpoint: Endpoint::ChatCompletions,
        request: Request::new(Prompt::Chat(messages)).with_options(options).with_render(render),
        params: chat.params,
        fields,
    })
}

pub(crate) fn completion_job(completion: CompletionRequest, info: &ModelInfo) -> Result<Job, ApiError> {
    let options = options(&completion.params, info)?;
    let prompt = match completion.prompt {
        CompletionPrompt::Text(t) => Prompt::Text(t),
        CompletionPrompt::Ids(ids) => Prompt::Ids(ids),
    };
    let fields = PromptFields { prompt: "prompt", max_tokens: completion.params.max_tokens_field };
    Ok(Job {
        endpoint: Endpoint::Completions,
        request: Request::new(prompt).with_options(options),
        params: completion.params,
        fields,
    })
}

/// The generation options: the request's values over the checkpoint's sampling defaults.
fn options(params: &GenerationParams, info: &ModelInfo) -> Result<GenerateOptions, ApiError> {
    if let Some(model) = params.model.as_deref().filter(|m| *m != info.served_name) {
        return Err(ApiError::ModelNotFound { requested: model.to_string(), served: info.served_name.clone() });
    }
    if !params.stop.is_empty() && !info.has_tokenizer {
        return Err(ApiError::field("stop", "stop strings need a tokenizer, and this model has none"));
    }
    Ok(GenerateOptions {
        max_tokens: params.max_tokens,
        sampling: params.sampling.apply(info.default_sampling.clone()),
        stop: params.stop.clone(),
        include_stop_str_in_output: params.include_stop_str_in_output,
        min_tokens: params.min_tokens,
        stop_token_ids: params.stop_token_ids.clone(),
        ignore_eos: params.ignore_eos,
        logprobs: params.logprobs,
        skip_special_tokens: params.skip_special_tokens,
    })
}

/// A message as the chat template reads it: text content as one string (text parts joined by
/// newlines, as vLLM does for templates that take strings). A vision-language model takes the
/// parts as they came (OpenAI's `image_url` parts): the engine reads the images, within the
/// server's image settings, and hands the template its image placeholders.
fn template_message(i: usize, m: &ChatMessage, takes_images: bool) -> Result<Json, ApiError> {
    let mut out = Map::new();
    out.insert("role".into(), json!(m.role.template_name()));
    let has_images = matches!(&m.content, Some(MessageContent::Parts(parts))
        if parts.iter().any(|p| matches!(p, ContentPart::ImageUrl { .. })));
    let content = match &m.content {
        None => Json::Null,
        Some(MessageContent::Text(t)) => json!(t),
        Some(MessageContent::Parts(parts)) if has_images && takes_images => Json::Array(
            parts
                .iter()
                .map(|part| match part {
                    ContentPart::Text(t) => json!({"type": "text", "text": t}),
                    ContentPart::ImageUrl { url, .. } => json!({"type": "image_url", "image_url": {"url": url}}),
                })
                .collect(),
        ),
        Some(MessageContent::Parts(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                match part {
                    ContentPart::Text(t) => texts.push(t.as_str()),
                    ContentPart::ImageUrl { .. } => {
                        return Err(ApiError::field(
                            format!("messages[{i}].content[{j}].type"),
                            "content part type `image_url`: the served model takes text only",
                        ))
                    }
                }
            }
            json!(texts.join("\n"))
        }
    };
    out.insert("content".into(), content);
    if let Some(name) = &m.name {
        out.insert("name".into(), json!(name));
    }
    if let Some(calls) = &m.tool_calls {
        out.insert("tool_calls".into(), json!(calls));
    }
    if let Some(id) = &m.tool_call_id {
        out.insert("tool_call_id".into(), json!(id));
    }
    if let Some(r) = &m.reasoning_content {
        out.insert("reasoning_content".into(), json!(r));
    }
    Ok(Json::Object(out))
}
