namespace FrugalLM; internal static class Placeholder {}
