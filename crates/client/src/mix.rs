//! The request mix of the load generator: `--mix square=90,hello=10`.

use std::fmt;
use std::str::FromStr;

use crate::wire::Kind;

/// Relative weights of each request [`Kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    /// Weights in [`Kind::ALL`] order.
    weights: [u32; 4],
    /// Running sums of `weights`, for picking.
    cumulative: [u64; 4],
}

/// Why a `--mix` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MixError {
    /// A name that is not one of the kinds.
    #[error("unknown request kind {0:?} (known: square, hello, sleep, text)")]
    UnknownKind(String),
    /// A weight that is not a non-negative integer.
    #[error("weight of {0} must be a non-negative integer, got {1:?}")]
    BadWeight(&'static str, String),
    /// Every weight is zero.
    #[error("every weight is zero: nothing to send")]
    Empty,
}

impl Mix {
    /// A mix with these weights, in [`Kind::ALL`] order.
    ///
    /// # Errors
    /// [`MixError::Empty`] when every weight is zero.
    pub fn new(weights: [u32; 4]) -> Result<Mix, MixError> {
        let mut cumulative = [0u64; 4];
        let mut sum = 0u64;
        for (c, w) in cumulative.iter_mut().zip(weights) {
            sum += u64::from(w);
            *c = sum;
        }
        if sum == 0 {
            return Err(MixError::Empty);
        }
        Ok(Mix {
            weights,
            cumulative,
        })
    }

    /// The weight of `kind`.
    pub fn weight(&self, kind: Kind) -> u32 {
        self.weights[kind as usize]
    }

    /// Picks a kind for a uniformly random `r`: each kind with probability
    /// weight / total.
    pub fn pick(&self, r: u64) -> Kind {
        let x = r % self.cumulative[3];
        let i = self.cumulative.iter().position(|&c| x < c).unwrap_or(0);
        Kind::ALL[i]
    }
}

impl Default for Mix {
    fn default() -> Self {
        Mix::new([100, 0, 0, 0]).expect("square has weight")
    }
}

impl FromStr for Mix {
    type Err = MixError;

    /// Parses `square=90,hello=10`; a bare name has weight 1, and kinds not
    /// named have weight 0.
    fn from_str(s: &str) -> Result<Mix, MixError> {
        let mut weights = [0u32; 4];
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = match part.split_once('=') {
                Some((n, w)) => (n.trim(), Some(w.trim())),
                None => (part, None),
            };
            let kind = Kind::ALL
                .into_iter()
                .find(|k| k.as_str() == name)
                .ok_or_else(|| MixError::UnknownKind(name.to_string()))?;
            weights[kind as usize] = match weight {
                None => 1,
                Some(w) => w
                    .parse()
                    .map_err(|_| MixError::BadWeight(kind.as_str(), w.to_string()))?,
            };
        }
        Mix::new(weights)
    }
}

impl fmt::Display for Mix {
    /// Renders the kinds with a non-zero weight: `square=90,hello=10`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for kind in Kind::ALL {
            let w = self.weight(kind);
            if w > 0 {
                if !first {
                    f.write_str(",")?;
                }
                write!(f, "{}={w}", kind.as_str())?;
                first = false;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_weights() {
        let m: Mix = "square=90,hello=10,sleep=0,text=0".parse().unwrap();
        assert_eq!(m.weight(Kind::Square), 90);
        assert_eq!(m.weight(Kind::Hello), 10);
        assert_eq!(m.to_string(), "square=90,hello=10");
        let m: Mix = " hello , text=3 ".parse().unwrap();
        assert_eq!(m.to_string(), "hello=1,text=3");
        assert_eq!(Mix::default().to_string(), "square=100");
    }

    #[test]
    fn refuses_nonsense() {
        assert_eq!(
            "cube=1".parse::<Mix>(),
            Err(MixError::UnknownKind("cube".into()))
        );
        assert_eq!(
            "square=-1".parse::<Mix>(),
            Err(MixError::BadWeight("square", "-1".into()))
        );
        assert_eq!("square=0".parse::<Mix>(), Err(MixError::Empty));
        assert_eq!("".parse::<Mix>(), Err(MixError::Empty));
    }

    #[test]
    fn picks_in_proportion() {
        let m: Mix = "square=3,sleep=1".parse().unwrap();
        let mut counts = [0; 4];
        for r in 0..400u64 {
            counts[m.pick(r) as usize] += 1;
        }
        assert_eq!(counts, [300, 0, 100, 0]);
    }
}
