// The closed enums the kernel ops take as ints. Their one definition is in Python
// (lossforge_kernels/reference/contrastive.py: Kind; reference/triplet.py: Distance, Mining;
// reference/distillation.py: Divergence);
// tests/test_enums.py reads this file and checks every enum here, name and value, against those.
// Unscoped enums over int: the values serve as int template arguments and compare with int64_t.
#pragma once

namespace lossforge {
namespace contrastive {

enum Kind : int { kInfoNce = 0, kSupCon = 1, kSigLip = 2 };

}  // namespace contrastive

namespace triplet {

enum Distance : int { kEuclidean = 0, kSquaredEuclidean = 1, kCosine = 2 };
enum Mining : int { kBatchHard = 0, kSemiHard = 1, kBatchAll = 2 };

}  // namespace triplet

namespace distillation {

enum Divergence : int { kKl = 0, kReverseKl = 1, kJsd = 2 };

}  // namespace distillation
}  // namespace lossforge
