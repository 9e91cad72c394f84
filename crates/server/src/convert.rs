//! Typed requests to engine requests, against the model served: its name, its chat template,
//! what it takes (text, and images for a vision-language model), and its sampling defaults.

use pio_runtime::chat_template::RenderOptions;
use pio_runtime::engine::{Engine, ModelInfo, Prompt, Request};
use pio_runtime::generate::GenerateOptions;
use pio_runtime::tokenizer::ChatTemplateSource;
use serde_json::{json, Map, Value as Json};

use crate::error::{ApiError, PromptFields};
use crate::forced_calls::ForcedCall;
use crate::parse::Endpoint;
use crate::protocol::request::{
    ChatCompletionRequest, ChatMessage, CompletionPrompt, CompletionRequest, ContentPart, GenerationParams,
    MessageContent, PromptTruncation, ToolChoice,
};
use crate::tool_calls::{ToolCallFormat, START};

/// What the served model's chat template and tokenizer say about its tool calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ToolSupport {
    /// The format its template renders calls in (None: no format the server reads).
    pub format: Option<ToolCallFormat>,
    /// Whether `<tool_call>` is a special token, which the default `skip_special_tokens` would
    /// take out of the text (as in Hermes-2-Pro's tokenizer; Qwen3's is not special).
    pub tag_is_special: bool,
}

impl ToolSupport {
    pub fn of(engine: &Engine) -> Self {
        let Some(tokenizer) = engine.tokenizer() else { return ToolSupport::default() };
        // Any of several named templates may be the one a request renders (`tool_use` with tools).
        let format = match tokenizer.chat_template_source() {
            None => None,
            Some(ChatTemplateSource::Single(source)) => ToolCallFormat::detect(source),
            Some(ChatTemplateSource::Named(named)) => named.values().find_map(|source| ToolCallFormat::detect(source)),
        };
        let tag_is_special =
            tokenizer.inner().get_added_tokens_decoder().values().any(|t| t.special && t.content == START);
        if let Some(format) = format {
            tracing::info!("tool calls: the {} format (from the chat template)", format.name());
        }
        ToolSupport { format, tag_is_special }
    }
}

/// How the calls in a chat answer are read: the model's format and the request's tools (whose
/// schemas type the parameters).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ToolParsing {
    pub format: ToolCallFormat,
    pub tools: Vec<Json>,
    /// `parallel_tool_calls`: false keeps an answer's first call only.
    pub parallel: bool,
}

/// A request ready for the engine, with what the response needs to know about it.
#[derive(Debug)]
pub(crate) struct Job {
    pub endpoint: Endpoint,
    /// One engine request per prompt (chat: one; completions: one per prompt of the batch form),
    /// each to be answered with `n` choices.
    pub prompts: Vec<Request>,
    pub params: GenerationParams,
    pub fields: PromptFields,
    /// Chat with tools and `tool_choice: "auto"`: how to find the calls in the answer.
    pub tools: Option<ToolParsing>,
    /// Chat with `tool_choice` `"required"` or a named function: the call forced on the answer.
    pub forced: Option<ForcedCall>,
}

impl Job {
    /// The engine requests of the job's choices: `n` of each prompt, prompt by prompt (choice
    /// `p * n + i` is prompt `p`'s `i`-th, OpenAI's order for a batch of prompts). With a seed,
    /// choice `i` of a prompt is seeded `seed + i` (wrapping), as vLLM's parallel sampling does
    /// (`get_child_sampling_params`), so that it answers as a lone request with that seed would
    /// and the choices differ; without one, each draws its own.
    /// The engine request of choice `choice`'s prompt (see [`choice_requests`](Self::choice_requests)).
    pub fn prompt_of(&self, choice: usize) -> &Request {
        &self.prompts[choice / self.params.n.max(1)]
    }

    pub fn choice_requests(&self) -> Vec<Request> {
        self.prompts
            .iter()
            .flat_map(|prompt| {
                (0..self.params.n).map(move |i| {
                    let mut request = prompt.clone();
                    let sampling = &mut request.options.sampling;
                    sampling.seed = sampling.seed.map(|seed| seed.wrapping_add(i as u64));
                    request
                })
            })
            .collect()
    }
}

pub(crate) fn chat_job(chat: ChatCompletionRequest, info: &ModelInfo, support: ToolSupport) -> Result<Job, ApiError> {
    let mut options = options(&chat.params, info)?;
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
    let tools = match (chat.tools.is_empty(), &chat.tool_choice, support.format) {
        // A forced call is read from its constrained JSON, whatever the model's own format.
        (true, _, _) | (false, ToolChoice::None | ToolChoice::Required | ToolChoice::Function(_), _) => None,
        (false, ToolChoice::Auto, Some(format)) => {
            Some(ToolParsing { format, tools: chat.tools.clone(), parallel: chat.parallel_tool_calls })
        }
        (false, ToolChoice::Auto, None) => {
            return Err(ApiError::field(
                "tools",
                "this model's chat template writes tool calls in no format the server reads (hermes \
                 `<tool_call>` JSON, qwen3_coder `<function=`, glm45 `<arg_key>`), so no call could be returned; \
                 `tool_choice: \"none\"` renders the tools anyway",
            ))
        }
    };
    let forced = ForcedCall::of(&chat.tools, &chat.tool_choice, chat.parallel_tool_calls)?;
    if let Some(forced) = &forced {
        options.structured_output = Some(forced.output.clone());
    }
    if tools.is_some() && support.tag_is_special {
        // The calls are read from the text: their tags must stay in it (vLLM's hermes parser does the same).
        options.skip_special_tokens = false;
    }
    let render = RenderOptions {
        add_generation_prompt: chat.template.add_generation_prompt,
        continue_final_message: chat.template.continue_final_message,
        // An empty list is no tools (`if tools` in the templates), as it was before tools were taken.
        tools: (!chat.tools.is_empty()).then_some(chat.tools),
        enable_thinking: chat.template.enable_thinking,
        documents: chat.template.documents,
        extra: chat.template.extra,
        ..RenderOptions::default()
    };
    let fields = PromptFields { prompt: "messages", max_tokens: chat.params.max_tokens_field, element: None };
    Ok(Job {
        endpoint: Endpoint::ChatCompletions,
        prompts: vec![salted(
            Request::new(Prompt::Chat(messages)).with_options(options).with_render(render),
            &chat.params,
        )],
        params: chat.params,
        fields,
        tools,
        forced,
    })
}

pub(crate) fn completion_job(completion: CompletionRequest, info: &ModelInfo) -> Result<Job, ApiError> {
    let options = options(&completion.params, info)?;
    let ids = completion.prompts.iter().any(|p| matches!(p, CompletionPrompt::Ids(_)));
    if completion.params.echo && ids && !info.has_tokenizer {
        return Err(ApiError::field(
            "echo",
            "echoing token ids needs a tokenizer to spell them, and this model has none",
        ));
    }
    let prompts = completion
        .prompts
        .into_iter()
        .map(|prompt| {
            let prompt = match prompt {
                CompletionPrompt::Text(t) => Prompt::Text(t),
                CompletionPrompt::Ids(ids) => Prompt::Ids(ids),
            };
            salted(Request::new(prompt).with_options(options.clone()), &completion.params)
        })
        .collect();
    let fields = PromptFields { prompt: "prompt", max_tokens: completion.params.max_tokens_field, element: None };
    Ok(Job { endpoint: Endpoint::Completions, prompts, params: completion.params, fields, tools: None, forced: None })
}

/// `request` with the client's `cache_salt`, if it sent one.
fn salted(request: Request, params: &GenerationParams) -> Request {
    match &params.cache_salt {
        Some(salt) => request.with_cache_salt(salt.clone()),
        None => request,
    }
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
        // The prompt alone (`echo` with `max_tokens: 0`): one token, not returned, as vLLM runs it.
        max_tokens: if params.echo_only() { Some(1) } else { params.max_tokens },
        sampling: params.sampling.apply(info.default_sampling.clone()),
        stop: params.stop.clone(),
        include_stop_str_in_output: params.include_stop_str_in_output,
        min_tokens: params.min_tokens,
        stop_token_ids: params.stop_token_ids.clone(),
        allowed_token_ids: params.allowed_token_ids.clone(),
        bad_words: params.bad_words.clone(),
        truncate_prompt_tokens: params.truncate_prompt_tokens.map(|t| match t {
            PromptTruncation::Last(n) => n,
            PromptTruncation::ToContext => info.max_model_len,
        }),
        ignore_eos: params.ignore_eos,
        logprobs: params.logprobs,
        prompt_logprobs: params.prompt_scores(),
        skip_special_tokens: params.skip_special_tokens,
        structured_output: params.structured.as_ref().map(|s| s.output.clone()),
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
        // An assistant message of tool calls only: vLLM renders its missing content as the empty
        // text, and templates rely on it (Qwen3's tests `'</think>' in message.content` and adds
        // the content to strings, which fails on none).
        None => json!(""),
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
        out.insert("tool_calls".into(), Json::Array(calls.iter().map(template_tool_call).collect()));
    }
    if let Some(id) = &m.tool_call_id {
        out.insert("tool_call_id".into(), json!(id));
    }
    if let Some(r) = &m.reasoning_content {
        out.insert("reasoning_content".into(), json!(r));
    }
    Ok(Json::Object(out))
}

/// A past tool call as the chat template reads it: OpenAI's `arguments` are a JSON string, and
/// templates that list the arguments (Qwen3-Coder's `arguments|items`, GLM's) need the object, so
/// a string holding an object becomes that object, as vLLM does before rendering (templates that
/// print the arguments, like Qwen3's, print the object as JSON). Anything else passes as it came.
fn template_tool_call(call: &Json) -> Json {
    let mut call = call.clone();
    if let Some(arguments) = call.pointer_mut("/function/arguments") {
        if let Some(object @ Json::Object(_)) = arguments.as_str().and_then(|s| serde_json::from_str(s).ok()) {
            *arguments = object;
        }
    }
    call
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_calls_reach_the_template_with_their_arguments_as_objects() {
        let call =
            |arguments: Json| json!({"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}});
        assert_eq!(template_tool_call(&call(json!("{\"a\": [1]}"))), call(json!({"a": [1]})));
        assert_eq!(template_tool_call(&call(json!({"a": 1}))), call(json!({"a": 1})));
        // Not an object: as it came (the template shows what the client sent).
        assert_eq!(template_tool_call(&call(json!("[1]"))), call(json!("[1]")));
        assert_eq!(template_tool_call(&call(json!("not json"))), call(json!("not json")));
        assert_eq!(template_tool_call(&json!({"id": "c"})), json!({"id": "c"}));
    }
}
