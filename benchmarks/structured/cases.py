"""Test data for structured-output benchmarks.

Holds (a) ``SCHEMAS``: short prompts paired with JSON schemas for
schema-constrained generation, and (b) ``TOOLS`` / ``TOOL_CASES``: a small
BFCL-style tool-calling evaluation set (OpenAI Chat Completions tool format),
including cases where the model should answer without calling a tool.
Prompts are short and contain the values the answer needs, for tiny models.
"""

from __future__ import annotations

from typing import Any

SCHEMAS: list[tuple[str, str, dict[str, Any]]] = [
    (
        "person_name_age",
        "Extract the person's name and age: Alice is 31 years old.",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 40},
                "age": {"type": "integer", "minimum": 0, "maximum": 130},
            },
            "required": ["name", "age"],
            "additionalProperties": False,
        },
    ),
    (
        "product_record",
        "Give a product record for a red mug that costs 8.50 dollars.",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "color": {"type": "string", "enum": ["red", "green", "blue", "black", "white"]},
                "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 10000},
                "in_stock": {"type": "boolean"},
            },
            "required": ["name", "color", "price"],
            "additionalProperties": False,
        },
    ),
    (
        "sentiment_label",
        "Classify the sentiment of this review: I loved this movie, it was great.",
        {
            "type": "object",
            "properties": {
                "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "required": ["sentiment"],
            "additionalProperties": False,
        },
    ),
    (
        "yes_no_answer",
        "Is water wet? Answer with a boolean.",
        {
            "type": "object",
            "properties": {"answer": {"type": "boolean"}},
            "required": ["answer"],
            "additionalProperties": False,
        },
    ),
    (
        "city_country",
        "Extract the city and country: I live in Lyon, France.",
        {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1, "maxLength": 40},
                "country": {"type": "string", "minLength": 1, "maxLength": 40},
            },
            "required": ["city", "country"],
            "additionalProperties": False,
        },
    ),
    (
        "address_nested",
        "Give the user's record: Bob lives at 12 Oak Street, Springfield, zip 12345.",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string", "maxLength": 60},
                        "city": {"type": "string", "maxLength": 40},
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$", "maxLength": 5},
                    },
                    "required": ["street", "city", "zip"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "address"],
            "additionalProperties": False,
        },
    ),
    (
        "order_three_levels",
        "Create an order for customer Dana (email dana@example.com) shipping to Boston, USA.",
        {
            "type": "object",
            "properties": {
                "customer": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 40},
                        "contact": {
                            "type": "object",
                            "properties": {
                                "email": {"type": "string", "maxLength": 60},
                                "phone": {"type": ["string", "null"], "maxLength": 20},
                            },
                            "required": ["email"],
                            "additionalProperties": False,
                        },
                    },
                    "required": ["name", "contact"],
                    "additionalProperties": False,
                },
                "shipping": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string", "maxLength": 40},
                        "country": {"type": "string", "maxLength": 40},
                    },
                    "required": ["city", "country"],
                    "additionalProperties": False,
                },
            },
            "required": ["customer", "shipping"],
            "additionalProperties": False,
        },
    ),
    (
        "shopping_list",
        "List the items to buy: milk, eggs and bread.",
        {
            "type": "object",
            "properties": {
                "items": {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1, "maxLength": 30},
                    "minItems": 1,
                    "maxItems": 5,
                },
            },
            "required": ["items"],
            "additionalProperties": False,
        },
    ),
    (
        "line_items",
        "Make an invoice with 2 pens at 1.50 each and 1 notebook at 4.00.",
        {
            "type": "object",
            "properties": {
                "lines": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "item": {"type": "string", "maxLength": 30},
                            "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
                            "unit_price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
                        },
                        "required": ["item", "quantity", "unit_price"],
                        "additionalProperties": False,
                    },
                    "minItems": 1,
                    "maxItems": 5,
                },
                "currency": {"const": "USD"},
            },
            "required": ["lines", "currency"],
            "additionalProperties": False,
        },
    ),
    (
        "lucky_numbers",
        "Give three numbers between 1 and 10.",
        {
            "type": "object",
            "properties": {
                "numbers": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 1, "maximum": 10},
                    "minItems": 3,
                    "maxItems": 3,
                },
            },
            "required": ["numbers"],
            "additionalProperties": False,
        },
    ),
    (
        "airport_code",
        "Extract the airport code: my flight leaves from JFK.",
        {
            "type": "object",
            "properties": {
                "code": {"type": "string", "pattern": "^[A-Z]{3}$", "minLength": 3, "maxLength": 3},
            },
            "required": ["code"],
            "additionalProperties": False,
        },
    ),
    (
        "flight_booking",
        "Book a flight from LAX to SFO for 2 passengers in economy class.",
        {
            "type": "object",
            "properties": {
                "origin": {"type": "string", "pattern": "^[A-Z]{3}$", "maxLength": 3},
                "destination": {"type": "string", "pattern": "^[A-Z]{3}$", "maxLength": 3},
                "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
                "cabin": {"type": "string", "enum": ["economy", "business", "first"]},
            },
            "required": ["origin", "destination", "passengers", "cabin"],
            "additionalProperties": False,
        },
    ),
    (
        "temperature_reading",
        "Record the reading: the temperature in Oslo is -3.5 degrees celsius.",
        {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "value": {"type": "number", "minimum": -90, "maximum": 60},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "value", "unit"],
            "additionalProperties": False,
        },
    ),
    (
        "task_item",
        "Create a task: buy groceries, priority high, not done yet.",
        {
            "type": "object",
            "properties": {
                "title": {"type": "string", "minLength": 1, "maxLength": 50},
                "priority": {"type": "string", "enum": ["low", "medium", "high"]},
                "done": {"type": "boolean"},
                "notes": {"type": ["string", "null"], "maxLength": 60},
            },
            "required": ["title", "priority", "done"],
            "additionalProperties": False,
        },
    ),
    (
        "book_info",
        "Give the book details: 1984 by George Orwell, published in 1949.",
        {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 50},
                "author": {"type": "string", "maxLength": 40},
                "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
                "genres": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 20},
                    "maxItems": 3,
                },
            },
            "required": ["title", "author", "year"],
            "additionalProperties": False,
        },
    ),
    (
        "color_rgb",
        "Give the RGB values for pure red.",
        {
            "type": "object",
            "properties": {
                "r": {"type": "integer", "minimum": 0, "maximum": 255},
                "g": {"type": "integer", "minimum": 0, "maximum": 255},
                "b": {"type": "integer", "minimum": 0, "maximum": 255},
            },
            "required": ["r", "g", "b"],
            "additionalProperties": False,
        },
    ),
    (
        "api_status",
        "Report a successful API response with code 200 and message OK.",
        {
            "type": "object",
            "properties": {
                "status": {"const": "success"},
                "code": {"type": "integer", "minimum": 100, "maximum": 599},
                "message": {"type": "string", "maxLength": 40},
            },
            "required": ["status", "code", "message"],
            "additionalProperties": False,
        },
    ),
    (
        "contact_optional_phone",
        "Extract the contact: Carol, email carol@mail.com, no phone number given.",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "email": {"type": "string", "maxLength": 60},
                "phone": {"type": ["string", "null"], "maxLength": 20},
            },
            "required": ["name", "email", "phone"],
            "additionalProperties": False,
        },
    ),
    (
        "id_any_of",
        "Return the user id for user number 42.",
        {
            "type": "object",
            "properties": {
                "user_id": {
                    "anyOf": [
                        {"type": "integer", "minimum": 0, "maximum": 1000000},
                        {"type": "string", "maxLength": 20},
                    ],
                },
            },
            "required": ["user_id"],
            "additionalProperties": False,
        },
    ),
    (
        "measurement_any_of",
        "The box is 30 cm wide. Give the width.",
        {
            "type": "object",
            "properties": {
                "width": {
                    "anyOf": [
                        {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
                        {"type": "null"},
                    ],
                },
                "unit": {"type": "string", "enum": ["cm", "m", "in"]},
            },
            "required": ["width", "unit"],
            "additionalProperties": False,
        },
    ),
    (
        "team_members",
        "List the team: Ann is the lead, Ben and Cal are engineers.",
        {
            "type": "object",
            "properties": {
                "team": {"type": "string", "maxLength": 30},
                "members": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "maxLength": 30},
                            "role": {"type": "string", "enum": ["lead", "engineer", "designer"]},
                        },
                        "required": ["name", "role"],
                        "additionalProperties": False,
                    },
                    "minItems": 1,
                    "maxItems": 5,
                },
            },
            "required": ["members"],
            "additionalProperties": False,
        },
    ),
    (
        "recipe",
        "Give a recipe for pancakes with flour, milk and eggs, ready in 20 minutes.",
        {
            "type": "object",
            "properties": {
                "dish": {"type": "string", "maxLength": 40},
                "ingredients": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 30},
                    "minItems": 1,
                    "maxItems": 5,
                },
                "minutes": {"type": "integer", "minimum": 1, "maximum": 600},
                "vegetarian": {"type": "boolean"},
            },
            "required": ["dish", "ingredients", "minutes"],
            "additionalProperties": False,
        },
    ),
    (
        "event_schedule",
        "Schedule a meeting called Standup on day 3 at hour 9 for 15 minutes.",
        {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 40},
                "when": {
                    "type": "object",
                    "properties": {
                        "day": {"type": "integer", "minimum": 1, "maximum": 31},
                        "hour": {"type": "integer", "minimum": 0, "maximum": 23},
                    },
                    "required": ["day", "hour"],
                    "additionalProperties": False,
                },
                "duration_minutes": {"type": "integer", "exclusiveMinimum": 0, "maximum": 480},
            },
            "required": ["title", "when", "duration_minutes"],
            "additionalProperties": False,
        },
    ),
    (
        "rating_score",
        "Rate this restaurant from 1 to 5 stars: the food was good but slow service.",
        {
            "type": "object",
            "properties": {
                "stars": {"type": "integer", "minimum": 1, "maximum": 5},
                "summary": {"type": "string", "minLength": 1, "maxLength": 60},
            },
            "required": ["stars", "summary"],
            "additionalProperties": False,
        },
    ),
    (
        "currency_amount",
        "Extract the price: the ticket costs 25 EUR.",
        {
            "type": "object",
            "properties": {
                "amount": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000000},
                "currency": {"type": "string", "pattern": "^[A-Z]{3}$", "maxLength": 3},
            },
            "required": ["amount", "currency"],
            "additionalProperties": False,
        },
    ),
    (
        "language_detect",
        "Which language is this sentence in: Bonjour, comment allez-vous?",
        {
            "type": "object",
            "properties": {
                "language": {
                    "type": "string",
                    "enum": ["english", "french", "spanish", "german", "italian"],
                },
            },
            "required": ["language"],
            "additionalProperties": False,
        },
    ),
    (
        "pet_record",
        "Make a record for a dog named Max who is 4 years old and vaccinated.",
        {
            "type": "object",
            "properties": {
                "species": {"type": "string", "enum": ["dog", "cat", "bird", "fish"]},
                "name": {"type": "string", "minLength": 1, "maxLength": 30},
                "age": {"type": "integer", "minimum": 0, "maximum": 40},
                "vaccinated": {"type": "boolean"},
            },
            "required": ["species", "name", "age", "vaccinated"],
            "additionalProperties": False,
        },
    ),
    (
        "geo_point_defs",
        "Give the coordinates of two points: A at latitude 10 longitude 20, B at latitude -5 longitude 30.",
        {
            "$defs": {
                "point": {
                    "type": "object",
                    "properties": {
                        "label": {"type": "string", "maxLength": 10},
                        "lat": {"type": "number", "minimum": -90, "maximum": 90},
                        "lon": {"type": "number", "minimum": -180, "maximum": 180},
                    },
                    "required": ["label", "lat", "lon"],
                    "additionalProperties": False,
                },
            },
            "type": "object",
            "properties": {
                "start": {"$ref": "#/$defs/point"},
                "end": {"$ref": "#/$defs/point"},
            },
            "required": ["start", "end"],
            "additionalProperties": False,
        },
    ),
    (
        "company_employees_defs",
        "Describe the company Acme with employees Eve (age 29) and Finn (age 41).",
        {
            "$defs": {
                "employee": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 30},
                        "age": {"type": "integer", "minimum": 16, "maximum": 100},
                    },
                    "required": ["name", "age"],
                    "additionalProperties": False,
                },
            },
            "type": "object",
            "properties": {
                "company": {"type": "string", "maxLength": 40},
                "employees": {
                    "type": "array",
                    "items": {"$ref": "#/$defs/employee"},
                    "minItems": 1,
                    "maxItems": 5,
                },
            },
            "required": ["company", "employees"],
            "additionalProperties": False,
        },
    ),
    (
        "movie_review_defs",
        "Review the movie Up from 2009: rating 9, tags animated and family.",
        {
            "$defs": {
                "tag": {"type": "string", "minLength": 1, "maxLength": 20},
            },
            "type": "object",
            "properties": {
                "movie": {
                    "type": "object",
                    "properties": {
                        "title": {"type": "string", "maxLength": 40},
                        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                    },
                    "required": ["title", "year"],
                    "additionalProperties": False,
                },
                "rating": {"type": "integer", "minimum": 0, "maximum": 10},
                "tags": {
                    "type": "array",
                    "items": {"$ref": "#/$defs/tag"},
                    "maxItems": 4,
                },
            },
            "required": ["movie", "rating"],
            "additionalProperties": False,
        },
    ),
    (
        "weather_report",
        "Give a weather report: it is sunny in Rome, 28 degrees, humidity 40 percent.",
        {
            "type": "object",
            "properties": {
                "location": {"type": "string", "maxLength": 40},
                "condition": {"type": "string", "enum": ["sunny", "cloudy", "rainy", "snowy"]},
                "temperature": {"type": "number", "minimum": -60, "maximum": 60},
                "humidity": {"type": "integer", "minimum": 0, "maximum": 100},
            },
            "required": ["location", "condition", "temperature"],
            "additionalProperties": False,
        },
    ),
    (
        "math_answer",
        "What is 7 times 6? Give the result as a number.",
        {
            "type": "object",
            "properties": {
                "result": {"type": "integer", "minimum": -1000, "maximum": 1000},
            },
            "required": ["result"],
            "additionalProperties": False,
        },
    ),
    (
        "username_rules",
        "Suggest a username for Grace Hopper using only lowercase letters.",
        {
            "type": "object",
            "properties": {
                "username": {
                    "type": "string",
                    "pattern": "^[a-z]+$",
                    "minLength": 3,
                    "maxLength": 16,
                },
            },
            "required": ["username"],
            "additionalProperties": False,
        },
    ),
    (
        "server_config",
        "Write a server config: host localhost, port 8080, debug on, log level info.",
        {
            "type": "object",
            "properties": {
                "server": {
                    "type": "object",
                    "properties": {
                        "host": {"type": "string", "maxLength": 40},
                        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                    },
                    "required": ["host", "port"],
                    "additionalProperties": False,
                },
                "debug": {"type": "boolean"},
                "log_level": {"type": "string", "enum": ["debug", "info", "warning", "error"]},
            },
            "required": ["server", "debug", "log_level"],
            "additionalProperties": False,
        },
    ),
    (
        "quiz_question",
        "Write a quiz question: What is 2 plus 2? Options 3, 4, 5. The answer is 4.",
        {
            "type": "object",
            "properties": {
                "question": {"type": "string", "minLength": 5, "maxLength": 60},
                "options": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 20},
                    "minItems": 2,
                    "maxItems": 4,
                },
                "answer": {"type": "string", "maxLength": 20},
            },
            "required": ["question", "options", "answer"],
            "additionalProperties": False,
        },
    ),
    (
        "version_info",
        "Give the package info: name shoal, version 1.2.3, stable release.",
        {
            "type": "object",
            "properties": {
                "package": {"type": "string", "maxLength": 30},
                "version": {
                    "type": "string",
                    "pattern": "^[0-9]+\\.[0-9]+\\.[0-9]+$",
                    "maxLength": 20,
                },
                "channel": {"type": "string", "enum": ["stable", "beta", "nightly"]},
            },
            "required": ["package", "version", "channel"],
            "additionalProperties": False,
        },
    ),
    (
        "student_grades",
        "Record the grades: Hana scored 88 in math and 92 in art.",
        {
            "type": "object",
            "properties": {
                "student": {"type": "string", "maxLength": 30},
                "grades": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "subject": {"type": "string", "maxLength": 20},
                            "score": {"type": "integer", "minimum": 0, "maximum": 100},
                        },
                        "required": ["subject", "score"],
                        "additionalProperties": False,
                    },
                    "minItems": 1,
                    "maxItems": 5,
                },
                "passed": {"type": "boolean"},
            },
            "required": ["student", "grades"],
            "additionalProperties": False,
        },
    ),
]


def _tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": False,
            },
        },
    }


TOOLS: dict[str, dict[str, Any]] = {
    "get_weather": _tool(
        "get_weather",
        "Get the current weather for a city.",
        {
            "city": {"type": "string", "description": "City name, e.g. Paris", "maxLength": 40},
            "unit": {
                "type": "string",
                "enum": ["celsius", "fahrenheit"],
                "description": "Temperature unit",
            },
        },
        ["city"],
    ),
    "search_web": _tool(
        "search_web",
        "Search the web and return the top results for a query.",
        {"query": {"type": "string", "description": "Search query", "maxLength": 60}},
        ["query"],
    ),
    "calculator": _tool(
        "calculator",
        "Evaluate an arithmetic expression such as 2 + 3 * 4.",
        {"expression": {"type": "string", "description": "Arithmetic expression", "maxLength": 60}},
        ["expression"],
    ),
    "send_email": _tool(
        "send_email",
        "Send an email to a recipient.",
        {
            "to": {"type": "string", "description": "Recipient email address", "maxLength": 60},
            "subject": {"type": "string", "description": "Email subject", "maxLength": 60},
            "body": {"type": "string", "description": "Email body text", "maxLength": 60},
        },
        ["to", "subject", "body"],
    ),
    "create_event": _tool(
        "create_event",
        "Create a calendar event.",
        {
            "title": {"type": "string", "description": "Event title", "maxLength": 40},
            "date": {
                "type": "string",
                "description": "Date as YYYY-MM-DD",
                "pattern": "^\\d{4}-\\d{2}-\\d{2}$",
                "maxLength": 10,
            },
            "time": {
                "type": "string",
                "description": "Time as HH:MM",
                "pattern": "^\\d{2}:\\d{2}$",
                "maxLength": 5,
            },
        },
        ["title", "date"],
    ),
    "convert_currency": _tool(
        "convert_currency",
        "Convert an amount of money from one currency to another.",
        {
            "amount": {"type": "number", "description": "Amount to convert", "exclusiveMinimum": 0},
            "from_currency": {
                "type": "string",
                "description": "Source currency code, e.g. USD",
                "pattern": "^[A-Z]{3}$",
                "maxLength": 3,
            },
            "to_currency": {
                "type": "string",
                "description": "Target currency code, e.g. EUR",
                "pattern": "^[A-Z]{3}$",
                "maxLength": 3,
            },
        },
        ["amount", "from_currency", "to_currency"],
    ),
    "get_stock_price": _tool(
        "get_stock_price",
        "Get the latest stock price for a ticker symbol.",
        {
            "ticker": {
                "type": "string",
                "description": "Stock ticker, e.g. AAPL",
                "pattern": "^[A-Z]{1,5}$",
                "maxLength": 5,
            },
        },
        ["ticker"],
    ),
    "translate_text": _tool(
        "translate_text",
        "Translate text into a target language.",
        {
            "text": {"type": "string", "description": "Text to translate", "maxLength": 60},
            "target_language": {
                "type": "string",
                "description": "Language to translate into, e.g. Spanish",
                "maxLength": 20,
            },
        },
        ["text", "target_language"],
    ),
    "set_timer": _tool(
        "set_timer",
        "Set a countdown timer.",
        {
            "minutes": {
                "type": "integer",
                "description": "Timer length in minutes",
                "minimum": 1,
                "maximum": 600,
            },
            "label": {"type": "string", "description": "Optional timer label", "maxLength": 30},
        },
        ["minutes"],
    ),
}


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": arguments}


TOOL_CASES: list[dict[str, Any]] = [
    {"id": "weather_paris_celsius", "prompt": "What's the weather in Paris in celsius?",
     "tools": ["get_weather", "search_web"], "expected": _call("get_weather", city="Paris", unit="celsius")},
    {"id": "weather_tokyo", "prompt": "What is the weather in Tokyo?",
     "tools": ["get_weather", "send_email"], "expected": _call("get_weather", city="Tokyo")},
    {"id": "weather_chicago_fahrenheit", "prompt": "Tell me the weather in Chicago in fahrenheit.",
     "tools": ["get_weather", "calculator", "set_timer"],
     "expected": _call("get_weather", city="Chicago", unit="fahrenheit")},
    {"id": "weather_berlin", "prompt": "Is it raining in Berlin right now?",
     "tools": ["search_web", "get_weather"], "expected": _call("get_weather", city="Berlin")},
    {"id": "search_python_release", "prompt": "Search the web for: latest Python release",
     "tools": ["search_web", "get_weather"], "expected": _call("search_web", query="latest Python release")},
    {"id": "search_best_pizza", "prompt": "Search the web for: best pizza in Naples",
     "tools": ["search_web", "translate_text", "calculator"],
     "expected": _call("search_web", query="best pizza in Naples")},
    {"id": "search_marathon_record", "prompt": "Look up on the web: marathon world record",
     "tools": ["calculator", "search_web"], "expected": _call("search_web", query="marathon world record")},
    {"id": "calc_add", "prompt": "Use the calculator to compute 12 + 30",
     "tools": ["calculator", "search_web"], "expected": _call("calculator", expression="12 + 30")},
    {"id": "calc_multiply", "prompt": "Calculate 45 * 17",
     "tools": ["calculator", "get_stock_price"], "expected": _call("calculator", expression="45 * 17")},
    {"id": "calc_divide", "prompt": "Compute 1024 / 8 with the calculator.",
     "tools": ["get_weather", "calculator", "set_timer"], "expected": _call("calculator", expression="1024 / 8")},
    {"id": "calc_parens", "prompt": "Evaluate (3 + 4) * 5",
     "tools": ["calculator", "convert_currency"], "expected": _call("calculator", expression="(3 + 4) * 5")},
    {"id": "email_bob_lunch",
     "prompt": "Send an email to bob@example.com with subject Lunch and body See you at noon.",
     "tools": ["send_email", "create_event"],
     "expected": _call("send_email", to="bob@example.com", subject="Lunch", body="See you at noon.")},
    {"id": "email_team_report",
     "prompt": "Email team@corp.com, subject Report, body The report is ready.",
     "tools": ["search_web", "send_email", "translate_text"],
     "expected": _call("send_email", to="team@corp.com", subject="Report", body="The report is ready.")},
    {"id": "email_ann_thanks",
     "prompt": "Send ann@mail.org an email with subject Thanks and body Thank you for the gift.",
     "tools": ["send_email", "get_weather"],
     "expected": _call("send_email", to="ann@mail.org", subject="Thanks", body="Thank you for the gift.")},
    {"id": "event_dentist", "prompt": "Create an event titled Dentist on 2025-03-14.",
     "tools": ["create_event", "set_timer"], "expected": _call("create_event", title="Dentist", date="2025-03-14")},
    {"id": "event_meeting_time", "prompt": "Create an event titled Team Meeting on 2025-06-02 at 10:30.",
     "tools": ["create_event", "send_email", "search_web"],
     "expected": _call("create_event", title="Team Meeting", date="2025-06-02", time="10:30")},
    {"id": "event_birthday", "prompt": "Add a calendar event called Birthday Party on 2024-12-20 at 18:00.",
     "tools": ["send_email", "create_event"],
     "expected": _call("create_event", title="Birthday Party", date="2024-12-20", time="18:00")},
    {"id": "event_launch", "prompt": "Schedule an event titled Launch on 2026-01-05.",
     "tools": ["create_event", "get_weather", "calculator"],
     "expected": _call("create_event", title="Launch", date="2026-01-05")},
    {"id": "convert_usd_eur", "prompt": "Convert 100 USD to EUR.",
     "tools": ["convert_currency", "calculator"],
     "expected": _call("convert_currency", amount=100, from_currency="USD", to_currency="EUR")},
    {"id": "convert_gbp_jpy", "prompt": "How much is 250 GBP in JPY?",
     "tools": ["get_stock_price", "convert_currency"],
     "expected": _call("convert_currency", amount=250, from_currency="GBP", to_currency="JPY")},
    {"id": "convert_eur_usd_decimal", "prompt": "Convert 19.99 EUR to USD.",
     "tools": ["convert_currency", "search_web", "calculator"],
     "expected": _call("convert_currency", amount=19.99, from_currency="EUR", to_currency="USD")},
    {"id": "convert_cad_chf", "prompt": "Convert 50 CAD to CHF please.",
     "tools": ["convert_currency", "translate_text"],
     "expected": _call("convert_currency", amount=50, from_currency="CAD", to_currency="CHF")},
    {"id": "stock_aapl", "prompt": "What is the stock price of AAPL?",
     "tools": ["get_stock_price", "search_web"], "expected": _call("get_stock_price", ticker="AAPL")},
    {"id": "stock_msft", "prompt": "Get the current price for ticker MSFT.",
     "tools": ["convert_currency", "get_stock_price"], "expected": _call("get_stock_price", ticker="MSFT")},
    {"id": "stock_tsla", "prompt": "How is TSLA stock trading today?",
     "tools": ["get_stock_price", "get_weather", "calculator"], "expected": _call("get_stock_price", ticker="TSLA")},
    {"id": "translate_hello_spanish", "prompt": "Translate Good morning into Spanish.",
     "tools": ["translate_text", "search_web"],
     "expected": _call("translate_text", text="Good morning", target_language="Spanish")},
    {"id": "translate_thanks_french", "prompt": "Translate Thank you very much into French.",
     "tools": ["send_email", "translate_text"],
     "expected": _call("translate_text", text="Thank you very much", target_language="French")},
    {"id": "translate_where_german", "prompt": "Translate Where is the station into German.",
     "tools": ["translate_text", "get_weather", "create_event"],
     "expected": _call("translate_text", text="Where is the station", target_language="German")},
    {"id": "timer_ten", "prompt": "Set a timer for 10 minutes.",
     "tools": ["set_timer", "create_event"], "expected": _call("set_timer", minutes=10)},
    {"id": "timer_tea", "prompt": "Set a timer for 5 minutes labeled Tea.",
     "tools": ["set_timer", "calculator"], "expected": _call("set_timer", minutes=5, label="Tea")},
    {"id": "timer_ninety", "prompt": "Start a 90 minute timer.",
     "tools": ["create_event", "set_timer", "get_weather"], "expected": _call("set_timer", minutes=90)},
    {"id": "timer_pasta", "prompt": "Set a timer for 12 minutes labeled Pasta.",
     "tools": ["set_timer", "search_web"], "expected": _call("set_timer", minutes=12, label="Pasta")},
    {"id": "weather_four_tools", "prompt": "What's the weather in Madrid?",
     "tools": ["search_web", "calculator", "send_email", "get_weather"],
     "expected": _call("get_weather", city="Madrid")},
    {"id": "stock_four_tools", "prompt": "What is the stock price of NVDA?",
     "tools": ["get_weather", "get_stock_price", "convert_currency", "calculator"],
     "expected": _call("get_stock_price", ticker="NVDA")},
    {"id": "convert_four_tools", "prompt": "Convert 75 AUD to USD.",
     "tools": ["calculator", "get_stock_price", "search_web", "convert_currency"],
     "expected": _call("convert_currency", amount=75, from_currency="AUD", to_currency="USD")},
    {"id": "no_tool_capital_france", "prompt": "What is the capital of France?",
     "tools": ["get_weather", "send_email"], "expected": None},
    {"id": "no_tool_say_hello", "prompt": "Say hello.",
     "tools": ["calculator", "set_timer"], "expected": None},
    {"id": "no_tool_joke", "prompt": "Tell me a short joke.",
     "tools": ["get_stock_price", "convert_currency"], "expected": None},
    {"id": "no_tool_color_sky", "prompt": "What color is the sky on a clear day?",
     "tools": ["get_weather", "search_web", "create_event"], "expected": None},
    {"id": "no_tool_greeting", "prompt": "Hi, how are you?",
     "tools": ["send_email", "translate_text"], "expected": None},
    {"id": "no_tool_poem", "prompt": "Write a two-line poem about cats.",
     "tools": ["calculator", "get_weather"], "expected": None},
    {"id": "no_tool_thanks", "prompt": "Thanks for your help!",
     "tools": ["set_timer", "create_event", "send_email"], "expected": None},
    {"id": "no_tool_legs_spider", "prompt": "How many legs does a spider have?",
     "tools": ["convert_currency", "get_stock_price"], "expected": None},
    {"id": "no_tool_define_noun", "prompt": "What is a noun? Answer in one sentence.",
     "tools": ["translate_text", "search_web"], "expected": None},
    {"id": "no_tool_opposite_hot", "prompt": "What is the opposite of hot?",
     "tools": ["get_weather", "set_timer"], "expected": None},
    {"id": "no_tool_days_week", "prompt": "How many days are in a week?",
     "tools": ["create_event", "calculator", "get_stock_price"], "expected": None},
    {"id": "no_tool_name_fruit", "prompt": "Name one fruit.",
     "tools": ["search_web", "send_email"], "expected": None},
]


def check_data() -> None:
    import jsonschema
    from jsonschema import Draft202012Validator

    assert len(SCHEMAS) >= 32, len(SCHEMAS)
    names = [name for name, _, _ in SCHEMAS]
    assert len(names) == len(set(names)), "duplicate schema names"
    for name, prompt, schema in SCHEMAS:
        assert isinstance(prompt, str) and prompt, name
        Draft202012Validator.check_schema(schema)

    for key, tool in TOOLS.items():
        assert tool["type"] == "function", key
        assert tool["function"]["name"] == key, key
        Draft202012Validator.check_schema(tool["function"]["parameters"])

    assert len(TOOL_CASES) >= 44, len(TOOL_CASES)
    ids = [case["id"] for case in TOOL_CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert sum(case["expected"] is None for case in TOOL_CASES) >= 10
    for case in TOOL_CASES:
        assert 2 <= len(case["tools"]) <= 4, case["id"]
        for tool_name in case["tools"]:
            assert tool_name in TOOLS, (case["id"], tool_name)
        expected = case["expected"]
        if expected is not None:
            assert expected["name"] in case["tools"], case["id"]
            params = TOOLS[expected["name"]]["function"]["parameters"]
            jsonschema.validate(expected["arguments"], params, cls=Draft202012Validator)


if __name__ == "__main__":
    check_data()
    print("ok")
