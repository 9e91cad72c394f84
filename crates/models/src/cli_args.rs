//! What the `pio` and `pio-export` command lines share (their logging is in [`crate::logging`]):
//!
//! - [`NumberRange`], a clap value parser that names the range a numeric flag takes, so that
//!   `--max-tokens 0` is answered with `must be a whole number >= 1` rather than a parse error;
//! - [`negative_numbers_as_values`], which lets clap read `-1` as a flag's value, so that
//!   `--max-tokens -1` gets that message too instead of clap's "unexpected argument '-1'";
//! - [`lint`], the check the commands' tests run over their whole command tree: every flag has
//!   help text, and every numeric flag reads `-1` as a value and refuses it, if it does, with
//!   the range.

use std::ffi::OsStr;
use std::fmt::{self, Display};
use std::ops::Bound;
use std::str::FromStr;

use clap::builder::TypedValueParser;
use clap::error::ErrorKind;
use clap::{Arg, Command, CommandFactory, FromArgMatches};

/// The number types a [`NumberRange`] takes.
pub trait Number: Copy + PartialOrd + Display + FromStr + Send + Sync + 'static {
    /// What the message calls a value of this type.
    const KIND: &'static str;
    /// Integers (their type's limits are a range worth naming).
    const WHOLE: bool;
    const MIN: Self;
    const MAX: Self;
    /// False for NaN and the infinities, which no flag takes.
    fn is_finite(self) -> bool;
}

macro_rules! whole_numbers {
    ($($t:ty),*) => {$(
        impl Number for $t {
            const KIND: &'static str = "a whole number";
            const WHOLE: bool = true;
            const MIN: Self = <$t>::MIN;
            const MAX: Self = <$t>::MAX;
            fn is_finite(self) -> bool {
                true
            }
        }
    )*};
}
whole_numbers!(u16, u32, u64, usize, i32, i64);

macro_rules! real_numbers {
    ($($t:ty),*) => {$(
        impl Number for $t {
            const KIND: &'static str = "a number";
            const WHOLE: bool = false;
            const MIN: Self = <$t>::MIN;
            const MAX: Self = <$t>::MAX;
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
        }
    )*};
}
real_numbers!(f32, f64);

/// The values a numeric flag takes; as a clap value parser (`#[arg(value_parser =
/// NumberRange::at_least(1usize))]`) it refuses anything else with a message that gives the
/// range: `invalid value '0' for '--max-tokens <N>': must be a whole number >= 1`.
#[derive(Clone, Copy, Debug)]
pub struct NumberRange<T> {
    low: Bound<T>,
    high: Bound<T>,
}

impl<T: Number> NumberRange<T> {
    /// Any value of the type (a finite one, for floating point).
    pub const fn any() -> Self {
        NumberRange { low: Bound::Unbounded, high: Bound::Unbounded }
    }
    /// `min` or more.
    pub const fn at_least(min: T) -> Self {
        NumberRange { low: Bound::Included(min), high: Bound::Unbounded }
    }
    /// More than `min`.
    pub const fn above(min: T) -> Self {
        NumberRange { low: Bound::Excluded(min), high: Bound::Unbounded }
    }
    /// From `min` to `max`, both included.
    pub const fn between(min: T, max: T) -> Self {
        NumberRange { low: Bound::Included(min), high: Bound::Included(max) }
    }
    /// More than `min`, up to `max` included.
    pub const fn above_up_to(min: T, max: T) -> Self {
        NumberRange { low: Bound::Excluded(min), high: Bound::Included(max) }
    }

    pub fn contains(&self, value: T) -> bool {
        let low = match self.low {
            Bound::Included(min) => value >= min,
            Bound::Excluded(min) => value > min,
            Bound::Unbounded => true,
        };
        let high = match self.high {
            Bound::Included(max) => value <= max,
            Bound::Excluded(max) => value < max,
            Bound::Unbounded => true,
        };
        value.is_finite() && low && high
    }

    /// `text` as a value in the range, or the message that says what the range is.
    pub fn parse(&self, text: &str) -> Result<T, String> {
        match text.trim().parse::<T>() {
            Ok(value) if self.contains(value) => Ok(value),
            _ => Err(format!("must be {}", self)),
        }
    }
}

impl<T: Number> Display for NumberRange<T> {
    /// `a whole number >= 1`, `a number in (0, 1]`, `a whole number in [0, 65535]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = T::KIND;
        let (low, high) = match (self.low, self.high) {
            // An integer type's own limits read as its range ("a whole number in [0, 65535]").
            (Bound::Unbounded, Bound::Unbounded) if T::WHOLE => (Bound::Included(T::MIN), Bound::Included(T::MAX)),
            bounds => bounds,
        };
        match (low, high) {
            (Bound::Unbounded, Bound::Unbounded) => write!(f, "a finite number"),
            (Bound::Included(min), Bound::Unbounded) => write!(f, "{kind} >= {min}"),
            (Bound::Excluded(min), Bound::Unbounded) => write!(f, "{kind} > {min}"),
            (Bound::Unbounded, Bound::Included(max)) => write!(f, "{kind} <= {max}"),
            (Bound::Unbounded, Bound::Excluded(max)) => write!(f, "{kind} < {max}"),
            (low, high) => {
                let (open, min) = match low {
                    Bound::Included(min) => ('[', min),
                    Bound::Excluded(min) => ('(', min),
                    Bound::Unbounded => unreachable!("matched above"),
                };
                let (close, max) = match high {
                    Bound::Included(max) => (']', max),
                    Bound::Excluded(max) => (')', max),
                    Bound::Unbounded => unreachable!("matched above"),
                };
                write!(f, "{kind} in {open}{min}, {max}{close}")
            }
        }
    }
}

impl<T: Number + Clone> TypedValueParser for NumberRange<T> {
    type Value = T;

    fn parse_ref(&self, cmd: &Command, arg: Option<&Arg>, value: &OsStr) -> Result<T, clap::Error> {
        // clap's own closure parser formats the error: "invalid value 'V' for '--flag <N>': must be ...".
        let range = *self;
        (move |text: &str| range.parse(text)).parse_ref(cmd, arg, value)
    }
}

/// `P`'s command line as the commands read it: with [`negative_numbers_as_values`].
pub fn command<P: CommandFactory>() -> Command {
    negative_numbers_as_values(P::command())
}

/// Parses the process's arguments into `P` with [`command`], exiting with clap's message and exit
/// code 2 on a usage error (as `P::parse()` does).
pub fn parse<P: CommandFactory + FromArgMatches>() -> P {
    P::from_arg_matches(&command::<P>().get_matches()).unwrap_or_else(|e| e.format(&mut command::<P>()).exit())
}

/// `cmd` with every flag that takes a value reading one that looks like a negative number (`-1`,
/// `-0.5`) as its value rather than as an unknown flag, in every subcommand: the value parser
/// then answers with the range the flag takes. A comma-separated list of numbers (`--batches
/// -1,8`) is read as the value too, whatever it starts with.
pub fn negative_numbers_as_values(cmd: Command) -> Command {
    cmd.mut_args(|arg| {
        if arg.is_positional() || !arg.get_action().takes_values() {
            arg
        } else if arg.get_value_delimiter().is_some() && is_numeric(&arg) {
            arg.allow_hyphen_values(true)
        } else {
            arg.allow_negative_numbers(true)
        }
    })
    .mut_subcommands(negative_numbers_as_values)
}

/// What is wrong with the command line `cmd` (from [`command`]), one line
/// per problem naming the subcommand and the flag: a flag without help text, or a numeric flag
/// that refuses `-1` as an unknown argument or without saying which values it takes.
pub fn lint(cmd: Command) -> Vec<String> {
    let mut cmd = cmd;
    cmd.build();
    let mut problems = Vec::new();
    lint_into(&cmd, &mut vec![cmd.get_name().to_string()], &cmd, &mut problems);
    problems
}

fn lint_into(root: &Command, path: &mut Vec<String>, cmd: &Command, problems: &mut Vec<String>) {
    for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
        let name = match arg.get_long() {
            Some(long) => format!("--{long}"),
            None => arg.get_id().to_string(),
        };
        let at = format!("{} {name}", path.join(" "));
        if arg.get_help().is_none() && arg.get_long_help().is_none() {
            problems.push(format!("{at}: no help text"));
        }
        if arg.get_action().takes_values() && !arg.is_positional() && is_numeric(arg) {
            if let Some(problem) = negative_value_problem(root, path, &name) {
                problems.push(format!("{at}: {problem}"));
            }
        }
    }
    for sub in cmd.get_subcommands() {
        path.push(sub.get_name().to_string());
        lint_into(root, path, sub, problems);
        path.pop();
    }
}

/// Whether `arg`'s values are numbers (read with a [`NumberRange`] or clap's own parser: both
/// report the number type).
fn is_numeric(arg: &Arg) -> bool {
    let id = arg.get_value_parser().type_id();
    macro_rules! any_of {
        ($($t:ty),*) => { false $(|| id == clap::builder::ValueParser::new(NumberRange::<$t>::any()).type_id())* };
    }
    any_of!(u16, u32, u64, usize, i32, i64, f32, f64)
}

/// Parses `path... flag -1` and says what is wrong with the answer, if anything.
fn negative_value_problem(root: &Command, path: &[String], flag: &str) -> Option<String> {
    let mut argv: Vec<&str> = path.iter().map(String::as_str).collect();
    argv.extend([flag, "-1"]);
    let error = root.clone().try_get_matches_from(&argv).err()?;
    let text = error.to_string();
    match error.kind() {
        ErrorKind::UnknownArgument => Some(format!("`-1` is not read as its value: {}", first_line(&text))),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue if !(text.contains(flag) && text.contains("must be")) => {
            Some(format!("`-1` is refused without the range: {}", first_line(&text)))
        }
        // Refused with the range, or taken (the error is then about something else).
        _ => None,
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use clap::{Parser, Subcommand};

    use super::*;

    #[test]
    fn ranges_parse_what_they_hold_and_name_themselves() {
        let count = NumberRange::at_least(1usize);
        assert_eq!(count.parse("3"), Ok(3));
        assert_eq!(count.parse("0").unwrap_err(), "must be a whole number >= 1");
        assert_eq!(count.parse("-1").unwrap_err(), "must be a whole number >= 1");
        assert_eq!(count.parse("x").unwrap_err(), "must be a whole number >= 1");
        assert_eq!(count.parse("99999999999999999999999").unwrap_err(), "must be a whole number >= 1");
        let share = NumberRange::above_up_to(0.0f64, 1.0);
        assert_eq!(share.parse("1"), Ok(1.0));
        assert_eq!(share.parse("0").unwrap_err(), "must be a number in (0, 1]");
        assert!(share.parse("NaN").is_err() && share.parse("inf").is_err());
        assert_eq!(NumberRange::above(0.0f32).parse("0").unwrap_err(), "must be a number > 0");
        assert_eq!(NumberRange::<u16>::any().parse("70000").unwrap_err(), "must be a whole number in [0, 65535]");
        assert_eq!(NumberRange::between(0i64, 4).parse("5").unwrap_err(), "must be a whole number in [0, 4]");
        assert_eq!(NumberRange::<f32>::any().parse("inf").unwrap_err(), "must be a finite number");
        assert_eq!(NumberRange::<f32>::any().parse("-2.5"), Ok(-2.5));
    }

    #[derive(Parser)]
    #[command(name = "demo")]
    struct Demo {
        #[command(subcommand)]
        command: DemoCommand,
    }

    #[derive(Subcommand)]
    enum DemoCommand {
        /// Has every problem the lint finds.
        Bad {
            /// Documented, but read with clap's own parser.
            #[arg(long)]
            plain: Option<usize>,
            #[arg(long, value_parser = NumberRange::at_least(1usize))]
            undocumented: Option<usize>,
        },
        /// Has none.
        Good {
            /// Tokens, at least 1.
            #[arg(long, value_parser = NumberRange::at_least(1usize))]
            tokens: Option<usize>,
            /// Any offset.
            #[arg(long, value_parser = NumberRange::<f32>::any())]
            offset: Option<f32>,
        },
    }

    #[test]
    fn negative_values_reach_the_parser_and_the_lint_finds_what_is_missing() {
        let cmd = command::<Demo>();
        let error = cmd.clone().try_get_matches_from(["demo", "good", "--tokens", "-1"]).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::ValueValidation);
        let text = error.to_string();
        assert!(text.contains("--tokens") && text.contains("must be a whole number >= 1"), "{text}");
        let matches = cmd.clone().try_get_matches_from(["demo", "good", "--offset", "-1.5"]).unwrap();
        let (_, sub) = matches.subcommand().unwrap();
        assert_eq!(sub.get_one::<f32>("offset"), Some(&-1.5));

        let problems = lint(cmd);
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(problems[0].starts_with("demo bad --plain: `-1` is refused without the range"), "{problems:#?}");
        assert_eq!(problems[1], "demo bad --undocumented: no help text");
        // Without negative numbers as values, `-1` is an unknown argument.
        let problems = lint(Demo::command());
        assert!(problems.iter().any(|p| p.starts_with("demo good --tokens: `-1` is not read")), "{problems:#?}");
    }
}
