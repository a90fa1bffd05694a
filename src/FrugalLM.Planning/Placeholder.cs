namespace FrugalLM.Planning; internal static class Placeholder {}
